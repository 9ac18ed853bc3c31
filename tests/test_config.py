import subprocess
import sys
from importlib.resources import files

import pytest

from nsa_dist.config import RunConfig, run_config
from nsa_dist.data import DataConfig
from nsa_dist.layer import NSAConfig
from nsa_dist.model import ModelConfig

GROUPS = ("model", "nsa", "data", "trainer")


def group_options(group):
    return sorted(p.name[:-len(".yaml")] for p in files("nsa_dist.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def test_every_group_has_its_documented_options():
    assert set(group_options("model")) >= {"tiny", "small", "base"}
    assert set(group_options("nsa")) >= {"paper", "fla", "tiny"}
    assert set(group_options("data")) >= {"passkey", "text", "tokens"}
    assert set(group_options("trainer")) >= {"cpu", "gpu"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes_and_converts(compose_config, tmp_path, group, option):
    data_file = tmp_path / "data.bin"
    data_file.write_bytes(bytes(range(256)) * 8)
    overrides = [f"{group}={option}"]
    if group == "data" and option != "passkey":
        overrides.append(f"data.path={data_file}")
    run = run_config(compose_config(*overrides))
    assert isinstance(run, RunConfig)
    assert isinstance(run.model, ModelConfig) and isinstance(run.nsa, NSAConfig)
    assert isinstance(run.data, DataConfig)
    assert run.data.seq_len % run.nsa.select_size == 0


def test_presets_hold_the_documented_values(compose_config):
    paper = run_config(compose_config("nsa=paper")).nsa
    assert (paper.block_len, paper.stride, paper.select_size, paper.top_n, paper.window) == (32, 16, 64, 16, 512)
    fla = run_config(compose_config("nsa=fla")).nsa
    assert (fla.block_len, fla.stride, fla.select_size, fla.top_n, fla.window, fla.compression) == \
        (64, 64, 64, 16, 0, "mean")
    base = run_config(compose_config("model=base")).model
    assert (base.hidden_size, base.num_layers) == (1024, 8)


def test_overrides_reach_the_dataclasses(compose_config):
    run = run_config(compose_config("trainer.lr=1e-4", "model.num_layers=3", "nsa.top_n=8", "data.seq_len=1024"))
    assert run.trainer.lr == 1e-4 and isinstance(run.trainer.lr, float)
    assert run.model.num_layers == 3 and run.nsa.top_n == 8 and run.data.seq_len == 1024


@pytest.mark.parametrize("override,error,match", [
    ("trainer.lr=-1", ValueError, r"trainer\.lr must be positive"),
    ("trainer.lr=fast", ValueError, r"trainer\.lr must be float"),
    ("trainer.optimizer=sgd", ValueError, r"unknown trainer\.optimizer='sgd'.*adamw"),
    ("trainer.precision=fp8", ValueError, r"trainer\.precision"),
    ("trainer.steps=0", ValueError, r"trainer\.steps must be positive"),
    ("nsa.backend=cuda_magic", ValueError, r"unknown backend 'cuda_magic'.*nsa="),
    ("nsa.window=-1", ValueError, r"window.*nsa="),
    ("nsa.compression=max", ValueError, r"compression"),
    ("data.seq_len=500", ValueError, r"data\.seq_len=500 is not a multiple of nsa\.select_size=32.*data\.seq_len=480"),
    ("data.kind=images", ValueError, r"unknown data\.kind='images'"),
    ("+model.depth=3", ValueError, r"unknown setting model\.depth"),
    ("model.num_kv_heads=3", ValueError, r"num_heads .* multiple of num_kv_heads.*model="),
    ("data=text", ValueError, r"data\.path="),
    ("data.seq_len=32", ValueError, r"cannot hold the passkey"),
])
def test_bad_values_name_the_key_and_the_fix(compose_config, override, error, match):
    with pytest.raises(error, match=match):
        run_config(compose_config(override))


def test_missing_data_file_is_named(compose_config, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nope\.txt"):
        run_config(compose_config("data=text", f"data.path={missing}"))


def test_cli_composes_from_the_installed_package(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "nsa_dist.train", "--cfg", "job", "model=small", "nsa=paper"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "hidden_size: 512" in shown.stdout and "window: 512" in shown.stdout


def test_cli_reports_a_bad_value_and_exits_nonzero(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "nsa_dist.train", "trainer.lr=-1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode != 0
    assert "trainer.lr must be positive" in bad.stdout + bad.stderr
