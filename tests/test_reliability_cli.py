"""The real command line, in a subprocess: a bad input or a fault is one line on stderr and a non-zero exit,
checked before any rank starts where it can be. Each case is a row of docs/reliability.md.
"""
import os
import subprocess
import sys

import pytest

TINY = ("model.num_layers=1", "data.seq_len=128", "trainer.batch_size=2", "trainer.eval_batch_size=2",
        "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.warmup_steps=1")


def run_cli(tmp_path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nsa_dist.train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith("nsa_dist: error: ")
    return lines[0]


def test_lr_1e9_stops_naming_the_non_finite_loss(tmp_path, fault_case):
    done = run_cli(tmp_path, *TINY, "trainer.steps=4", "trainer.lr=1e9")
    line = one_line(done)
    assert "non-finite loss" in line and "lower trainer.lr" in line
    assert not (tmp_path / "run" / "final.pt").exists()
    fault_case("lr_1e9", "`trainer.lr=1e9`", exit_code=done.returncode, seen=line)


@pytest.mark.parametrize("case, args, expected", [
    ("unknown_key", ("trainer.foo=1",), "Key 'foo' not in 'TrainConfig'"),
    ("unknown_group_entry", ("model=huge",), "Could not find 'model/huge'"),
    ("bad_value", ("trainer.lr=-1",), "trainer.lr must be positive"),
    ("wrong_type", ("trainer.steps=many",), "trainer.steps"),
    ("cfg_job_invalid", ("--cfg", "job", "trainer.steps=0"), "trainer.steps must be positive"),
])
def test_a_config_error_is_one_line(tmp_path, fault_case, case, args, expected):
    done = run_cli(tmp_path, *args)
    line = one_line(done)
    assert expected in line and "Traceback" not in done.stdout
    fault_case(case, "`" + " ".join(args) + "`", exit_code=done.returncode, seen=line)


def test_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", "nsa_dist.train", "trainer.lr=-1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "trainer.lr must be positive" in done.stderr


def test_a_mesh_that_does_not_fit_the_launch_fails_before_any_rank_starts(tmp_path, fault_case):
    args = ("launcher=torchrun", "launcher.nproc_per_node=2", "parallel.dp_size=2", "parallel.sp_size=2")
    done = run_cli(tmp_path, *TINY, *args)
    line = one_line(done)
    assert "does not fit a job of 2 rank(s)" in line and "launcher=torchrun starts 2" in line
    assert "starting 2 ranks" not in done.stdout and not list((tmp_path / "run").glob("rank*.log"))
    fault_case("torchrun_mesh_does_not_fit", "`" + " ".join(args) + "`", exit_code=done.returncode, seen=line)


def test_a_failing_rank_is_reported_once(tmp_path, fault_case):
    args = ("launcher=torchrun", "launcher.nproc_per_node=2", "launcher.timeout_s=60", "trainer.lr=1e9")
    done = run_cli(tmp_path, *TINY, "trainer.steps=4", *args, timeout=300)
    line = one_line(done)
    assert "non-finite loss" in line and "(rank 0, traceback in" in line
    assert (done.stdout + done.stderr).count("non-finite loss") == 1, done.stdout[-3000:]
    assert "Traceback" in (tmp_path / "run" / "rank0.log").read_text()
    fault_case("rank_fails_under_torchrun", "`" + " ".join(args) + "`: both ranks stop", exit_code=done.returncode,
               seen=line)
