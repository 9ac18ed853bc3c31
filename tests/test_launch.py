"""End to end through the Hydra CLI on a real Slurm and a real Ray cluster, both on 127.0.0.1.

CI starts them with `bash launch/ci/start_slurm.sh` and `bash launch/ci/start_ray.sh`; without them
those tests skip and say why. Each run trains a tiny model for a few steps and must leave, in its
run directory, distributed.json showing both ranks in one process group and TensorBoard events
with a falling loss. The torchrun-style test needs no cluster and always runs.
"""
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multirank import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RAY_PORT = int(os.environ.get("NSA_RAY_PORT", 6380))
RAY_ADDRESS = f"127.0.0.1:{RAY_PORT}"
TINY = ("model=tiny", "nsa=tiny", "data=passkey", "data.seq_len=256", "trainer=cpu", "trainer.steps=15",
        "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.eval_every=0", "trainer.warmup_steps=3",
        "trainer.progress_bar=false")
JOB_TIMEOUT_S = 300


def slurm_unavailable() -> str | None:
    for module in ("submitit", "hydra_plugins.hydra_submitit_launcher"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[launch]')"
    if shutil.which("sinfo") is None:
        return "no Slurm client on PATH (CI runs launch/ci/start_slurm.sh)"
    try:
        states = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError) as e:
        return f"Slurm is not running (`sinfo` failed: {e}); start it with `bash launch/ci/start_slurm.sh`"
    if not any(s.startswith(("idle", "mixed")) for s in states):
        return f"no idle Slurm node (sinfo states: {states}); see launch/ci/start_slurm.sh"
    return None


def ray_unavailable() -> str | None:
    for module in ("ray", "hydra_plugins.hydra_ray_launcher"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[launch]')"
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", RAY_PORT)) != 0:
            return f"no Ray head on {RAY_ADDRESS}; start one with `bash launch/ci/start_ray.sh`"
    return None


SLURM_MISSING, RAY_MISSING = slurm_unavailable(), ray_unavailable()
# CI starts both clusters, so there a missing one is a failure, never a quiet skip.
REQUIRE_CLUSTERS = os.environ.get("CI", "").lower() in ("1", "true")


def needs(missing: str | None):
    def mark(test):
        if missing is None:
            return test
        if REQUIRE_CLUSTERS:
            @functools.wraps(test)
            def fail(*args, **kwargs):
                pytest.fail(f"CI=true but {missing}")
            return fail
        return pytest.mark.skip(reason=missing)(test)
    return mark


needs_slurm = needs(SLURM_MISSING)
needs_ray = needs(RAY_MISSING)


def hydra_cli(*args: str, cwd: Path, timeout: float = JOB_TIMEOUT_S,
              **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")}
    env.update(env_overrides)
    # Keeps every Ray socket of the driver on loopback, and matches the auth mode of the head that
    # launch/ci/start_ray.sh starts (token unless RAY_AUTH_MODE says otherwise).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("RAY_AUTH_MODE", "token")
    done = subprocess.run([sys.executable, "-m", "nsa_dist.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done


def assert_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
                                  f"--- stderr\n{done.stderr[-6000:]}")


def assert_two_rank_run(run_dir: Path, started_by: str) -> None:
    record = json.loads((run_dir / "distributed.json").read_text())
    assert record["world_size"] == 2 and record["started_by"] == started_by and record["backend"] == "gloo"
    assert [r["rank"] for r in record["ranks"]] == [0, 1]
    assert len({(r["host"], r["pid"]) for r in record["ranks"]}) == 2, "both ranks are one process"
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 15
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss went {first:.3f} -> {last:.3f}"


def test_torchrun_style_two_ranks_on_this_host(tmp_path):
    done = hydra_cli("launcher=torchrun", "launcher.nproc_per_node=2", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert_ok(done)
    assert_two_rank_run(tmp_path / "run", "torchrun")


def test_two_torchrun_nodes_meet_at_one_rendezvous(tmp_path):
    """The multi-node path, as two 'nodes' on this host that meet only through the rendezvous endpoint."""
    port = free_port()
    node = ("launcher=torchrun", "launcher.nnodes=2", "launcher.nproc_per_node=1",
            f"launcher.rdzv_endpoint=127.0.0.1:{port}", "launcher.rdzv_id=two_nodes", *TINY)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # Two 'nodes' share this host's cores; each would otherwise take all of them and spin against the other.
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.Popen([sys.executable, "-m", "nsa_dist.train", *node, f"hydra.run.dir={tmp_path / 'a'}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        second = hydra_cli(*node, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, OMP_NUM_THREADS="1")
        out, _ = first.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        first.kill()
    assert first.returncode == 0, out[-4000:]
    assert_ok(second)
    # Whichever node joined first holds rank 0 and writes the run's outputs.
    run_dir = next(d for d in (tmp_path / "a", tmp_path / "b") if (d / "distributed.json").exists())
    assert_two_rank_run(run_dir, "torchrun")


@needs_slurm
def test_sbatch_template_runs_two_ranks(tmp_path):
    """launch/slurm.sbatch as a user without Hydra's launcher submits it, scaled down to this CPU node."""
    template = Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch"
    submitted = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
                                "--gpus-per-node=0", "--time=10", f"--output={tmp_path / 'slurm-%j.out'}",
                                str(template), *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True).stdout
        state = next((f.split("=", 1)[1] for f in info.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id])
    log = (tmp_path / f"slurm-{job_id}.out").read_text() if (tmp_path / f"slurm-{job_id}.out").exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state or 'never'}\n{log[-4000:]}"
    assert_two_rank_run(tmp_path / "outputs" / "slurm" / job_id, "slurm")


@needs_slurm
def test_two_ranks_on_slurm_through_the_submitit_launcher(tmp_path):
    done = hydra_cli("-m", "launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
                     *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert_ok(done)
    assert_two_rank_run(tmp_path / "sweep" / "0", "slurm")


@needs_slurm
@pytest.mark.parametrize("override,message", [
    ("hydra.launcher.partition=no_such_partition", "Slurm has no partition 'no_such_partition'"),
    ("hydra.launcher.tasks_per_node=64", "64 tasks x 1 CPUs"),
])
def test_slurm_request_that_cannot_run_fails_before_submission(tmp_path, override, message):
    started = time.monotonic()
    done = hydra_cli("-m", "launcher=slurm", override, *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]
    assert "nsa_dist: cannot launch" in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "sweep" / ".submitit").exists(), "something was submitted"


@needs_ray
def test_two_ranks_as_ray_actors(tmp_path):
    done = hydra_cli("launcher=ray", f"launcher.address={RAY_ADDRESS}", "launcher.num_workers=2", *TINY,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_ok(done)
    assert_two_rank_run(tmp_path / "run", "ray")


@needs_ray
def test_sweep_of_two_configs_through_the_ray_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    done = hydra_cli("-m", "launcher=ray", f"launcher.address={RAY_ADDRESS}", "launcher.num_workers=2", *TINY,
                     "trainer.lr=3e-3,2e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=2 * JOB_TIMEOUT_S)
    assert_ok(done)
    for job, lr in ((0, "0.003"), (1, "0.002")):
        assert f"trainer.lr={lr}" in (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert_two_rank_run(sweep / str(job), "ray")


@needs_ray
def test_more_ray_ranks_than_the_cluster_has_fails_at_once(tmp_path):
    started = time.monotonic()
    done = hydra_cli("launcher=ray", f"launcher.address={RAY_ADDRESS}", "launcher.num_workers=64", *TINY,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert "launcher.num_workers=64 needs 64 CPU but the whole Ray cluster has" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 60
