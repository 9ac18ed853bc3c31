import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module


@pytest.fixture
def compose_config():
    """Compose nsa_dist.conf/config.yaml with command-line style overrides, as `nsa-train` would."""

    def _compose(*overrides: str):
        with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


def pytest_configure(config):
    # DeepSpeed builds an shm op (g++, about a minute) the first time it starts on CPU; one cache for every
    # test process and run, so CI pays for it once.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "nsa_dist_torch_extensions"))


# `NSA_DIST_RELIABILITY_RECORD=<file> pytest tests/test_reliability*.py` appends every fault case the tests
# see to <file> (JSON lines); `python tests/reliability_doc.py <file>` renders docs/reliability.md from it.
RELIABILITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
_TMP_PATHS = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s'\"]+")


@pytest.fixture
def fault_case(tmp_path):
    """Record what a user sees for one bad input: `record(case, given, exit_code=..., seen=...)`.

    Without the recording variable, checks that docs/reliability.md has the case's row, so that a new
    fault test fails until the doc is regenerated.
    """
    record_to = os.environ.get("NSA_DIST_RELIABILITY_RECORD")

    def record(case: str, given: str, *, exit_code: int, seen: str, aliases: dict[str, str] | None = None) -> None:
        for raw, alias in {str(tmp_path): "<tmp>", **(aliases or {})}.items():
            seen, given = seen.replace(raw, alias), given.replace(raw, alias)
        seen, given = _TMP_PATHS.sub("<tmp>", seen), _TMP_PATHS.sub("<tmp>", given)
        if record_to:
            with open(record_to, "a") as f:
                f.write(json.dumps({"case": case, "given": given, "exit_code": exit_code, "seen": seen}) + "\n")
            return
        assert f"<a id=\"{case}\"></a>" in RELIABILITY_DOC.read_text(), (
            f"docs/reliability.md has no row for fault case {case!r}: regenerate it "
            "(NSA_DIST_RELIABILITY_RECORD=/tmp/cases.jsonl pytest tests/test_reliability*.py && "
            "python tests/reliability_doc.py /tmp/cases.jsonl)")

    return record
