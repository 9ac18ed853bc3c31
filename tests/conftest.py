import os
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
