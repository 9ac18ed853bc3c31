import pytest
from hydra import compose, initialize_config_module


@pytest.fixture
def compose_config():
    """Compose nsa_dist.conf/config.yaml with command-line style overrides, as `nsa-train` would."""

    def _compose(*overrides: str):
        with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose
