"""The layering of docs/architecture.md, read from the source: nothing imports from a layer above it, and
no product file grows past the size a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package name setuptools maps it to (pyproject.toml package-dir).
PACKAGES = {"kernels": "nsa_dist.kernels", "parallel": "nsa_dist.parallel", "launch": "nsa_dist.launch",
            "nsa_dist": "nsa_dist"}
MODEL_MODULES = {"layer", "model", "convert", "hf", "parallelize", "models"}
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
    `pkg.mod` (a class imported that way shows as `pkg.Class` too; `_upward` tells the two apart)."""
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


def _allowed(module: str) -> tuple[str, ...]:
    """The nsa_dist modules (prefixes) that `module` may import, by its layer."""
    def inside(package):
        return module == package or module.startswith(package + ".")

    if inside("nsa_dist.kernels"):
        return ("nsa_dist.kernels",)
    if inside("nsa_dist.parallel"):
        return ("nsa_dist.parallel", "nsa_dist.kernels")
    if inside("nsa_dist.launch"):
        return ("nsa_dist.launch",)
    if module.rpartition(".")[2] in MODEL_MODULES:
        return ("nsa_dist.parallel", "nsa_dist.kernels", *(f"nsa_dist.{m}" for m in MODEL_MODULES))
    return ("nsa_dist",)


def _is_allowed(imported: str, allowed: tuple[str, ...]) -> bool:
    # `from nsa_dist import X` also records the bare package; the names it binds are checked one by one.
    return imported == "nsa_dist" or any(imported == a or imported.startswith(a + ".") for a in allowed)


def _upward(module: str, imported: set[str]) -> list[str]:
    allowed = _allowed(module)
    top = {p.stem for p in (ROOT / "nsa_dist").glob("*.py")} | set(PACKAGES) | {"conf"}
    # `from nsa_dist import NSAConfig` binds a name re-exported by the package, not a module: skip it.
    return sorted(m for m in imported if not _is_allowed(m, allowed)
                  and not (m.count(".") == 1 and m.partition(".")[2] not in top))


@pytest.mark.parametrize("path", list(_product_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_layer_above_it(path):
    module = _module_name(path)
    upward = _upward(module, _imports(path.read_text(), module, is_package=path.name == "__init__.py"))
    assert not upward, f"{module} imports {upward}; its layer may import only {_allowed(module)} " \
        "(docs/architecture.md)"


def test_the_checker_sees_upward_imports():
    source = "from nsa_dist.train import main\nfrom ..kernels import nsa_attention\nfrom nsa_dist import config\n"
    imported = _imports(source, "nsa_dist.parallel.probe")
    assert {"nsa_dist.train", "nsa_dist.kernels", "nsa_dist.config"} <= imported
    assert _upward("nsa_dist.parallel.probe", imported) == ["nsa_dist.config", "nsa_dist.train", "nsa_dist.train.main"]
    assert _upward("nsa_dist.layer", _imports("from nsa_dist.engine import TrainEngine", "nsa_dist.layer")) \
        == ["nsa_dist.engine", "nsa_dist.engine.TrainEngine"]
    assert _upward("nsa_dist.train", imported) == []


def test_product_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _product_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines, split them by what they own: {long}"
