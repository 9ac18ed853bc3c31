"""The layering of docs/architecture.md, read from the source: nothing imports from a layer above it, no
module imports itself back through others (no import circle, inside a layer too), and no product file grows
past the size a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package name setuptools maps it to (pyproject.toml package-dir).
PACKAGES = {"kernels": "nsa_dist.kernels", "parallel": "nsa_dist.parallel", "launch": "nsa_dist.launch",
            "nsa_dist": "nsa_dist"}
# Each layer -> the layers it may import, its own included; listed from the top of the data path down.
# Top-level modules of nsa_dist (the public API, config, and the train, eval and report entry points)
# may import everything. training's RunConfig holds the launcher's section, a plain dataclass
# (nsa_dist.launch.config), which is all training may read of launch.
LAYERS = {
    "nsa_dist.training": ("nsa_dist.training", "nsa_dist.analysis", "nsa_dist.data", "nsa_dist.nn",
                          "nsa_dist.parallel", "nsa_dist.kernels", "nsa_dist.launch.config"),
    "nsa_dist.analysis": ("nsa_dist.analysis", "nsa_dist.data", "nsa_dist.nn", "nsa_dist.parallel",
                          "nsa_dist.kernels"),
    "nsa_dist.data": ("nsa_dist.data", "nsa_dist.parallel", "nsa_dist.kernels"),
    "nsa_dist.nn": ("nsa_dist.nn", "nsa_dist.parallel", "nsa_dist.kernels"),
    "nsa_dist.parallel": ("nsa_dist.parallel", "nsa_dist.kernels"),
    "nsa_dist.kernels": ("nsa_dist.kernels",),
    "nsa_dist.launch": ("nsa_dist.launch",),
}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files():
    for folder in PACKAGES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(source: str, name: str, *, is_package: bool = False) -> set[str]:
    """The nsa_dist modules that module `name` imports, relative imports resolved, `from pkg import mod` as
    `pkg.mod` (a class imported that way shows as `pkg.Class` too; `_resolve` tells the two apart).
    Imports inside functions and under TYPE_CHECKING count: each is a dependency all the same."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nsa_dist"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "nsa_dist" or base.startswith("nsa_dist."):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("nsa_dist")}


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def _upward(module: str, imported: set[str]) -> list[str]:
    layer = _layer(module)
    if layer is None:  # a top-level module of nsa_dist
        return []
    allowed = LAYERS[layer]
    # `from nsa_dist import NSAConfig` binds a name re-exported by the package: it is the package itself.
    return sorted(m for m in imported if m != "nsa_dist"
                  and not any(m == a or m.startswith(a + ".") for a in allowed))


def _graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports: `from pkg import mod` is an edge to `pkg.mod` when that
    is a module, to `pkg` when it binds a name defined there."""
    def owner(name):
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, (source, is_package) in sources.items():
        edges = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                one = ast.Module(body=[node], type_ignores=[])
                bases = _imports(ast.unparse(one), module, is_package=is_package)
                names = [m for m in bases if any(m.endswith("." + a.name) for a in node.names)] \
                    if isinstance(node, ast.ImportFrom) else sorted(bases)
                edges.update(owner(m) for m in names)
        graph[module] = {m for m in edges if m} - {module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (each an import circle), sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in _product_files()}


@pytest.mark.parametrize("path", list(_product_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_layer_above_it(path):
    module = _module_name(path)
    upward = _upward(module, _imports(path.read_text(), module, is_package=path.name == "__init__.py"))
    assert not upward, f"{module} imports {upward}; its layer may import only {LAYERS[_layer(module)]} " \
        "(docs/architecture.md)"


def test_the_checker_sees_upward_imports():
    source = "from nsa_dist.train import main\nfrom ..kernels import nsa_attention\nfrom nsa_dist import config\n"
    imported = _imports(source, "nsa_dist.parallel.probe")
    assert {"nsa_dist.train", "nsa_dist.kernels", "nsa_dist.config"} <= imported
    assert _upward("nsa_dist.parallel.probe", imported) == ["nsa_dist.config", "nsa_dist.train", "nsa_dist.train.main"]
    assert _upward("nsa_dist.nn.layer", _imports("from nsa_dist.training.engine import TrainEngine", "nsa_dist.nn.layer")) \
        == ["nsa_dist.training.engine", "nsa_dist.training.engine.TrainEngine"]
    assert _upward("nsa_dist.data.tasks", _imports("from nsa_dist.nn import hf", "nsa_dist.data.tasks")) \
        == ["nsa_dist.nn", "nsa_dist.nn.hf"]
    assert _upward("nsa_dist.train", imported) == []


def test_the_package_has_no_import_circle():
    circles = _circles(_graph(_package_sources()))
    assert not circles, f"import circles (each group imports itself back): {circles}; move what both need " \
        "into a module below them"


def test_the_circle_check_catches_a_planted_circle():
    sources = _package_sources()
    # Inside one layer, through a function-level import, the way circles hide.
    sources["nsa_dist.nn.layer"] = (sources["nsa_dist.nn.layer"][0] + "\n\ndef _probe():\n"
                                    "    from nsa_dist.nn.convert import convert_attention\n", False)
    assert any({"nsa_dist.nn.convert", "nsa_dist.nn.layer"} <= set(c) for c in _circles(_graph(sources)))
    # Across layers, three modules long.
    planted = {"nsa_dist.a": ("from nsa_dist.b import x\n", False), "nsa_dist.b": ("import nsa_dist.c\n", False),
               "nsa_dist.c": ("from nsa_dist import a\n", False), "nsa_dist": ("", True)}
    assert _circles(_graph(planted)) == [["nsa_dist.a", "nsa_dist.b", "nsa_dist.c"]]


def test_product_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _product_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines, split them by what they own: {long}"
