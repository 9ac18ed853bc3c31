"""The real command line, in a subprocess: a bad input or a fault is one line on stderr and a non-zero exit,
checked before any rank starts where it can be. Each case is a row of docs/reliability.md.
"""
import os
import subprocess
import sys

import pytest

TINY = ("model.num_layers=1", "data.seq_len=128", "trainer.batch_size=2", "trainer.eval_batch_size=2",
        "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.warmup_steps=1")


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(tmp_path, *args: str, timeout: float = 180, run_dir=None, env: dict | None = None,
            module: str = "nsa_dist.train") -> subprocess.CompletedProcess:
    """`python -m <module> ARGS` in `tmp_path`; the trainer gets `hydra.run.dir=<run_dir or tmp_path/run>`."""
    if module == "nsa_dist.train":
        args = (*args, f"hydra.run.dir={run_dir or tmp_path / 'run'}")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=cli_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


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
    ("rope_theta_zero", ("model.rope_theta=0",), "rope_theta=0.0 makes the rotary frequencies non-finite"),
    ("norm_eps_negative", ("model.norm_eps=-1",), "norm_eps=-1.0 puts a negative"),
    ("grad_clip_nan", ("trainer.grad_clip=nan",), "trainer.grad_clip=nan is not a finite number"),
    ("lr_inf", ("trainer.lr=inf",), "trainer.lr=inf is not a finite number"),
    ("pretrained_path_missing", ("model=hf_llama", "model.pretrained_path=/nonexistent/llama"), "does not exist"),
    ("unquoted_tilde_path", ("data=text", "data.path=~/book.txt"), "quote the value"),
    ("unquoted_non_ascii_path", ("data=text", "data.path=/data/bücher.txt"), "no 'ü' in an unquoted value"),
    ("launcher_setting_without_launcher", ("launcher.nproc_per_node=2",), "read by launcher=torchrun only"),
    ("ray_setting_under_torchrun", ("launcher=torchrun", "launcher.num_workers=4"), "read by launcher=ray only"),
])
def test_a_config_error_is_one_line(tmp_path, fault_case, case, args, expected):
    done = run_cli(tmp_path, *args)
    line = one_line(done)
    assert expected in line and "Traceback" not in done.stdout
    # refused before Hydra starts: not even an empty directory is left
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
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


def test_ray_not_installed_is_one_line(tmp_path, fault_case):
    shadow = tmp_path / "no_ray"
    shadow.mkdir()
    # What a machine without Ray sees: `import ray` fails.
    (shadow / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    done = run_cli(tmp_path, "launcher=ray", env={"PYTHONPATH": str(shadow)})
    line = one_line(done)
    assert "launcher=ray needs Ray" in line and "nsa_dist[launch]" in line
    fault_case("ray_not_installed", "`launcher=ray` where Ray is not installed", exit_code=done.returncode, seen=line)


def test_a_disk_that_fills_while_saving_leaves_no_half_file(tmp_path, fault_case):
    run = tmp_path / "run"
    run.mkdir()
    # The final save writes final.pt.tmp first; here that name leads to /dev/full, a device that is always full.
    (run / "final.pt.tmp").symlink_to("/dev/full")
    done = run_cli(tmp_path, *TINY, "trainer.steps=2")
    line = one_line(done)
    assert "the disk is full" in line and str(run / "final.pt") in line
    assert sorted(p.name for p in run.glob("final.pt*")) == []
    fault_case("disk_full", "the disk fills while `final.pt` is written", exit_code=done.returncode, seen=line)
