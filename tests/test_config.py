import dataclasses
import itertools
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from nsa_dist.config import SECTIONS, RunConfig, run_config

CONF = files("nsa_dist.conf")
GROUPS = ("model", "nsa", "data", "trainer", "parallel", "zero", "launcher")


def group_options(group):
    return sorted(p.name[:-len(".yaml")] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def stated(group, option):
    """The values a group file sets itself, without its defaults list."""
    values = yaml.safe_load(CONF.joinpath(group, f"{option}.yaml").read_text()) or {}
    values.pop("defaults", None)
    if group == "launcher":  # `# @package _global_`: its own section sits under `launcher:`
        values = values.get("launcher", {})
    return values


def with_data_file(tmp_path, group, option):
    if group == "data" and option == "files":
        (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 8)
        return [f"data.path={tmp_path}"]
    if group == "data" and option not in ("passkey", "stdlib"):
        data_file = tmp_path / "data.bin"
        data_file.write_bytes(bytes(range(256)) * 8)
        return [f"data.path={data_file}"]
    return []


def test_every_group_has_its_documented_options():
    assert set(group_options("model")) >= {"tiny", "small", "base"}
    assert set(group_options("nsa")) >= {"paper", "fla", "tiny"}
    assert set(group_options("data")) >= {"passkey", "text", "tokens"}
    assert set(group_options("trainer")) >= {"cpu", "gpu"}
    assert set(group_options("experiment")) >= {"smoke", "scaling_smoke", "scaling_strong", "scaling_weak"}


def test_every_config_file_is_one_these_tests_compose():
    """A new group or file outside the groups above would otherwise go untested."""
    root = Path(str(CONF))
    found = {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}
    covered = {"config.yaml"} | {f"{g}/{o}.yaml" for g in (*GROUPS, "experiment") for o in group_options(g)}
    # Hydra's sweep launchers, selected by launcher=ray|slurm and instantiated in tests/test_launch_config.py.
    covered |= {"hydra/launcher/nsa_ray.yaml", "hydra/launcher/nsa_slurm.yaml"}
    assert found == covered


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_file_converts_to_its_dataclass_with_the_values_it_states(compose_config, tmp_path, group,
                                                                              option):
    run = run_config(compose_config(f"{group}={option}", *with_data_file(tmp_path, group, option)))
    assert isinstance(run, RunConfig)
    section = getattr(run, group)
    assert type(section) is SECTIONS[group]
    values = dataclasses.asdict(section)
    for key, value in stated(group, option).items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation, resolved at conversion
        assert values[key] == value, f"{group}/{option}.yaml sets {key}={value!r}, the dataclass holds {values[key]!r}"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_group_files_state_only_what_differs_from_the_schema(group, option):
    defaults = dataclasses.asdict(SECTIONS[group]())
    same = {k: v for k, v in stated(group, option).items() if k != "kind" and defaults.get(k) == v}
    assert not same, f"{group}/{option}.yaml restates the schema's defaults {same}: drop them"


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_converts_and_changes_only_what_it_states(compose_config, experiment):
    text = CONF.joinpath("experiment", f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    spec = yaml.safe_load(text)
    spec.pop("hydra", None)  # its sweep: test_every_experiment_sweep_point_converts
    # `override /trainer: gpu` in its defaults list is `trainer=gpu` on the command line.
    groups = [f"{key.removeprefix('override').strip().strip('/')}={value}"
              for entry in spec.pop("defaults", []) for key, value in entry.items()]
    base = dataclasses.asdict(run_config(compose_config(*groups)))
    composed = compose_config(f"experiment={experiment}")
    changed = dataclasses.asdict(run_config(composed))
    for section, values in spec.items():
        for key, value in values.items():
            if isinstance(value, str) and value.startswith("${"):  # an interpolation: what it resolves to
                value = OmegaConf.select(composed, f"{section}.{key}")
                assert changed[section][key] == value, f"experiment={experiment} sets {section}.{key}"
                continue
            assert changed[section][key] == value, f"experiment={experiment} sets {section}.{key}"
            assert base[section][key] != value, f"experiment={experiment} restates {section}.{key}={value!r}"
    for section in base:
        unstated = {k: v for k, v in base[section].items() if k not in spec.get(section, {})}
        assert {k: changed[section][k] for k in unstated} == unstated, \
            f"experiment={experiment} changed {section} beyond what it states"


def sweep_points(experiment):
    """`(experiment, [key=value, ...])` for every job of the experiment's `hydra.sweeper.params`."""
    spec = yaml.safe_load(CONF.joinpath("experiment", f"{experiment}.yaml").read_text())
    params = ((spec.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    choices = [[f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in params.items()]
    return [(experiment, list(point)) for point in itertools.product(*choices)] if choices else []


@pytest.mark.parametrize("experiment,point", [p for e in group_options("experiment") for p in sweep_points(e)],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_every_experiment_sweep_point_converts(compose_config, experiment, point):
    """Each job of an experiment's sweep is a valid run, with the swept values (e.g. data.seq_len fits every P)."""
    run = dataclasses.asdict(run_config(compose_config(f"experiment={experiment}", *point)))
    for override in point:
        key, value = override.split("=", 1)
        section, name = key.split(".", 1)
        assert str(run[section][name]) == value, f"experiment={experiment} {override} did not reach the run"


def test_presets_hold_the_documented_values(compose_config):
    paper = run_config(compose_config("nsa=paper")).nsa
    assert (paper.block_len, paper.stride, paper.select_size, paper.top_n, paper.window) == (32, 16, 64, 16, 512)
    fla = run_config(compose_config("nsa=fla")).nsa
    assert (fla.block_len, fla.stride, fla.select_size, fla.top_n, fla.window, fla.compression) == \
        (64, 64, 64, 16, 0, "mean")
    base = run_config(compose_config("model=base")).model
    assert (base.hidden_size, base.num_layers) == (1024, 8)


def test_overrides_reach_the_dataclasses(compose_config):
    run = run_config(compose_config("trainer.lr=1e-4", "model.num_layers=3", "nsa.top_n=8", "data.seq_len=1024",
                                    "launcher=torchrun", "launcher.nproc_per_node=3"))
    assert run.trainer.lr == 1e-4 and isinstance(run.trainer.lr, float)
    assert run.model.num_layers == 3 and run.nsa.top_n == 8 and run.data.seq_len == 1024
    assert run.launcher.kind == "torchrun" and run.launcher.nproc_per_node == 3


@pytest.mark.parametrize("override,error,match", [
    ("trainer.lr=-1", ValueError, r"trainer\.lr must be positive"),
    ("trainer.optimizer=sgd", ValueError, r"unknown trainer\.optimizer='sgd'.*adamw"),
    ("trainer.precision=fp8", ValueError, r"trainer\.precision"),
    ("trainer.precision=fp16", ValueError, r"trainer\.precision=fp16 is not supported: fp16 needs a loss scaler.*bf16"),
    ("trainer.steps=0", ValueError, r"trainer\.steps must be positive"),
    ("nsa.backend=cuda_magic", ValueError, r"unknown backend 'cuda_magic'.*nsa="),
    ("nsa.window=-1", ValueError, r"window.*nsa="),
    ("nsa.compression=max", ValueError, r"compression"),
    ("data.seq_len=500", ValueError, r"data\.seq_len=500 is not a multiple of nsa\.select_size=32.*data\.seq_len=480"),
    ("data.kind=images", ValueError, r"unknown data\.kind='images'"),
    ("+model.depth=3", ValueError, r"unknown setting model\.depth: model takes vocab_size, hidden_size"),
    ("model.num_kv_heads=3", ValueError, r"num_heads .* multiple of num_kv_heads.*model="),
    ("data=text", ValueError, r"data\.path="),
    ("data.seq_len=32", ValueError, r"cannot hold the passkey"),
    ("launcher.kind=mpi", ValueError, r"unknown launcher\.kind='mpi'"),
])
def test_bad_values_name_the_key_and_the_fix(compose_config, override, error, match):
    with pytest.raises(error, match=match):
        run_config(compose_config(override))


@pytest.mark.parametrize("override", ["trainer.lr=fast", "model.depth=3", "launcher.use_gpu=3.5"])
def test_the_schema_rejects_wrong_types_and_unknown_keys_while_composing(compose_config, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        compose_config(override)


def test_missing_data_file_is_named(compose_config, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nope\.txt"):
        run_config(compose_config("data=text", f"data.path={missing}"))


def test_cli_composes_from_the_installed_package(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "nsa_dist.train", "--cfg", "job", "model=small", "nsa=paper",
                            "experiment=smoke"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["model"]["hidden_size"] == 512 and printed["nsa"]["window"] == 512
    assert printed["trainer"]["steps"] == 5 and printed["launcher"]["kind"] == "local"


def test_cli_reports_a_bad_value_and_exits_nonzero(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "nsa_dist.train", "trainer.lr=-1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode != 0
    assert "trainer.lr must be positive" in bad.stdout + bad.stderr
