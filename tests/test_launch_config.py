"""Every config group and launcher entry composes and instantiates; launch requests that cannot be met
fail at once with a message that names the fix. Nothing here needs a running Slurm or Ray."""
import os
import subprocess
import sys
import time
from importlib.resources import files

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from multirank import free_port
from omegaconf import OmegaConf

from nsa_dist.config import RunConfig, run_config
from nsa_dist.launch import LauncherConfig
from nsa_dist.launch.address import split_address
from nsa_dist.launch.launch_check import LaunchCheck
from nsa_dist.launch.slurm import check_slurm_request, gpus_in_gres
from nsa_dist.train import main
from tests.test_config import with_data_file

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_ray_launcher")


def options(group):
    return sorted(p.name[:-len(".yaml")] for p in files("nsa_dist.conf").joinpath(*group.split("/")).iterdir()
                  if p.name.endswith(".yaml"))


def compose_with_hydra(*overrides):
    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def instantiate_hydra_plugins(*overrides):
    """The composed config, and the sweep launcher and callbacks built the way `--multirun` builds them."""
    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        callbacks = Callbacks(cfg)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=main, config=cfg)
    return cfg, launcher, callbacks


def test_launcher_group_has_every_kind():
    assert set(options("launcher")) >= {"local", "torchrun", "ray", "slurm", "slurm_gpu"}
    assert set(options("hydra/launcher")) >= {"nsa_ray", "nsa_slurm"}


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "nsa", "data", "trainer", "parallel", "zero",
                                                            "launcher", "experiment") for o in options(g)])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=compose",
                 *with_data_file(tmp_path, group, option)]
    cfg, hydra_launcher, callbacks = instantiate_hydra_plugins(*overrides)
    run = run_config(cfg)
    assert isinstance(run, RunConfig)
    launcher = run.launcher
    assert isinstance(launcher, LauncherConfig)
    expected = {"slurm": "SlurmLauncher", "slurm_gpu": "SlurmLauncher", "ray": "RayLauncher"}
    if group == "launcher":
        assert launcher.kind == option.removesuffix("_gpu")
        assert type(hydra_launcher).__name__ == expected.get(option, "BasicLauncher")
        checks = [c for c in callbacks.callbacks if isinstance(c, LaunchCheck)]
        assert len(checks) == (1 if option in expected else 0)


def test_ray_sweep_launcher_joins_the_jobs_cluster_without_object_store_memory():
    cfg = compose_with_hydra("launcher=ray", "launcher.address=127.0.0.1:6380")
    init = OmegaConf.to_container(cfg.hydra.launcher.ray.init, resolve=True)
    assert init == {"address": "127.0.0.1:6380", "object_store_memory": None}
    assert cfg.hydra.launcher.ray.remote.num_cpus == 0


def test_slurm_gpu_runs_one_task_per_gpu():
    cfg = compose_with_hydra("launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4")
    assert cfg.hydra.launcher.tasks_per_node == 4


def test_unknown_launcher_setting_names_the_choices():
    cfg = compose_with_hydra("launcher=ray", "+launcher.num_gpus=2")
    with pytest.raises(ValueError, match="unknown setting launcher.num_gpus: launcher takes kind, backend"):
        run_config(cfg)


@pytest.mark.parametrize("gres,gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:2,tmp:1", 2)])
def test_gpu_count_from_slurm_gres(gres, gpus):
    assert gpus_in_gres(gres) == gpus


def test_split_address():
    assert split_address("127.0.0.1:6380") == ("127.0.0.1", 6380)
    assert split_address("ray://head:10001") == ("head", 10001)
    with pytest.raises(ValueError, match="not host:port"):
        split_address("head")


def test_torchrun_refuses_more_ranks_than_cores(tmp_path):
    cfg = compose_with_hydra("launcher=torchrun", "launcher.nproc_per_node=4096", "trainer.device=cpu")
    with pytest.raises(ValueError, match="nproc_per_node=4096 is more ranks than this host"):
        main(cfg, run_dir=tmp_path)


def test_slurm_outside_slurm_says_how_to_submit(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = compose_with_hydra("launcher=slurm")
    with pytest.raises(RuntimeError, match="not in a Slurm job"):
        main(cfg, run_dir=tmp_path)


def test_unreachable_ray_address_fails_in_seconds(tmp_path):
    port = free_port()
    cfg = compose_with_hydra("launcher=ray", f"launcher.address=127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        main(cfg, run_dir=tmp_path)
    assert time.monotonic() - started < 15


def test_unreachable_ray_address_fails_the_sweep_in_seconds(tmp_path):
    port = free_port()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "nsa_dist.train", "-m", "launcher=ray",
                           f"launcher.address=127.0.0.1:{port}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           "trainer.lr=1e-3,2e-3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**_clean_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert done.returncode != 0
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in done.stderr + done.stdout
    assert time.monotonic() - started < 60


def _clean_env():
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")}


@pytest.fixture
def fake_sinfo(tmp_path, monkeypatch):
    """A `sinfo` that answers like a cluster with a 2-node gpu partition (8 GPUs, 64 CPUs each) and a cpu partition."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sinfo"
    script.write_text("""#!/bin/sh
case "$*" in
  *--format=%P*) printf 'cpu*\\ngpu\\n' ;;
  *--partition=gpu) printf 'g1|64|gpu:h100:8(S:0-1)|gpu\\ng2|64|gpu:h100:8(S:0-1)|gpu\\n' ;;
  *--partition=*) ;;
  *) printf 'c1|32|(null)|cpu*\\ng1|64|gpu:h100:8(S:0-1)|gpu\\ng2|64|gpu:h100:8(S:0-1)|gpu\\n' ;;
esac
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_request_check_against_partition_sizes(fake_sinfo):
    check_slurm_request(partition="gpu", nodes=2, tasks_per_node=8, cpus_per_task=8, gpus_per_node=8)
    check_slurm_request(partition=None, nodes=1, tasks_per_node=32, cpus_per_task=1, gpus_per_node=0)
    with pytest.raises(ValueError, match="no partition 'gpux': set hydra.launcher.partition to one of cpu, gpu"):
        check_slurm_request(partition="gpux", nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0)
    with pytest.raises(ValueError, match="hydra.launcher.nodes=3 but gpu has 2 node"):
        check_slurm_request(partition="gpu", nodes=3, tasks_per_node=8, cpus_per_task=8, gpus_per_node=8)
    with pytest.raises(ValueError, match="largest node has 64 CPUs and 8 GPUs"):
        check_slurm_request(partition="gpu", nodes=1, tasks_per_node=16, cpus_per_task=1, gpus_per_node=16)
    with pytest.raises(ValueError, match="largest node has 32 CPUs and 0 GPUs"):
        check_slurm_request(partition=None, nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=1)
