"""A run directory belongs to one run, damaged weights are named, and eval and the report say what they
compare: each case run as a user runs it (the command lines in a subprocess) and recorded as a row of
docs/reliability.md through the `fault_case` fixture.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from test_reliability_cli import TINY, cli_env, one_line, run_cli


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at step 2, trained from the command line."""
    root = tmp_path_factory.mktemp("finished")
    done = run_cli(root, *TINY, "trainer.steps=2", "trainer.checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.fixture
def old_run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one bit inside the data of the largest tensor of a torch.save zip (not its pickle or directory)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), \
        int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_second_run_in_the_same_directory_is_refused_and_ctrl_c_is_one_line(tmp_path, fault_case):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nsa_dist.train", *TINY, "trainer.steps=100000",
                              "trainer.checkpoint_every=2", f"hydra.run.dir={run}"], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob("checkpoints/step_*[0-9]")) and time.monotonic() < deadline:
            time.sleep(0.5)
        second = run_cli(tmp_path, *TINY, "trainer.steps=4")
        line = one_line(second)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "in use by another run" in line
        fault_case("two_runs_one_dir", "a second `python -m nsa_dist.train` with the same `hydra.run.dir` while the "
                   "first runs", exit_code=second.returncode, seen=line, aliases={str(first.pid): "<pid>", f" on {socket.gethostname()},": " on <host>,"})
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert first.returncode == 130 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("nsa_dist: interrupted after step ") and "trainer.resume=auto" in lines[0]
    assert not (run / ".nsa_dist.lock").exists()
    fault_case("ctrl_c", "Ctrl-C during `trainer.checkpoint_every=2` training", exit_code=130,
               seen=_steps_as_n(lines[0]))


def _steps_as_n(line: str) -> str:
    import re

    return re.sub(r"step_\d{8}", "step_<n>", re.sub(r"step \d+ of", "step <n> of", line))


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, fault_case):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / ".nsa_dist.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                    "started": "2026-01-01T00:00:00"}))
    done = run_cli(tmp_path, *TINY, "trainer.steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in (done.stdout + done.stderr).splitlines() if "taking over the lock" in ln)
    assert f"pid {gone.pid}" in line and not (run / ".nsa_dist.lock").exists()
    fault_case("stale_lock", "a lock left by a process that is gone (same host)", exit_code=0,
               seen="warning: " + line.split(" - ", 1)[-1],
               aliases={str(gone.pid): "<pid>", f" on {socket.gethostname()},": " on <host>,"})


@pytest.mark.parametrize("case, args, expected", [
    ("resume_never_over_a_run", ("trainer.resume=never",), "trainer.resume=never would start a new one over it"),
    ("changed_config_over_a_run", ("model.hidden_size=64",), "model.hidden_size: checkpoint 128, this run 64"),
    ("changed_resumable_key_over_a_run", ("nsa.top_n=3",), "trainer.resume_accept=[nsa.top_n]"),
])
def test_a_new_run_over_an_old_one_is_refused_writing_nothing(old_run, tmp_path, fault_case, case, args, expected):
    before = snapshot(old_run)
    done = run_cli(tmp_path, *TINY, "trainer.steps=2", "trainer.checkpoint_every=2", *args)
    line = one_line(done)
    assert expected in line and "trainer.move_old_run=true" in line and str(old_run) in line
    # Hydra's .hydra/ files, distributed.json, the log, final.pt and the checkpoints are as they were.
    assert snapshot(old_run) == before
    fault_case(case, f"`{' '.join(args)}` where a finished run is", exit_code=done.returncode, seen=line)


def test_a_rerun_over_a_run_without_checkpoints_is_refused(tmp_path, fault_case):
    first = run_cli(tmp_path, *TINY, "trainer.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(tmp_path / "run")
    done = run_cli(tmp_path, *TINY, "trainer.steps=1")
    line = one_line(done)
    assert "left no checkpoint to resume from" in line and snapshot(tmp_path / "run") == before
    fault_case("rerun_without_checkpoint", "the same command again, in a run directory whose run kept no "
               "checkpoint", exit_code=done.returncode, seen=line)


def test_move_old_run_renames_the_old_run_aside(old_run, tmp_path, fault_case):
    before = snapshot(old_run)
    done = run_cli(tmp_path, *TINY, "trainer.steps=2", "trainer.resume=never", "trainer.move_old_run=true")
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in (done.stdout + done.stderr).splitlines() if "moved the old run aside" in ln)
    moved = next(tmp_path.glob("run.moved-*"))
    assert snapshot(moved) == before and (old_run / "final.pt").is_file()
    assert not list((old_run / "checkpoints").glob("step_*")) if (old_run / "checkpoints").exists() else True
    fault_case("move_old_run", "`trainer.resume=never trainer.move_old_run=true` where a finished run is",
               exit_code=0, seen="warning: " + line.split(" - ", 1)[-1].replace(moved.name, "run.moved-<time>"))


def test_an_empty_run_dir_is_refused(tmp_path, fault_case):
    done = run_cli(tmp_path, *TINY, run_dir="''")
    line = one_line(done)
    assert "hydra.run.dir is empty" in line and list(tmp_path.iterdir()) == []
    fault_case("run_dir_empty", "`hydra.run.dir=''`", exit_code=done.returncode, seen=line)


def test_a_damaged_byte_in_a_checkpoint_tensor_falls_back_to_the_previous(tmp_path, fault_case):
    first = run_cli(tmp_path, *TINY, "trainer.steps=4", "trainer.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = tmp_path / "run" / "checkpoints" / "step_00000004" / "model_optimizer.pt"
    flip_a_tensor_byte(damaged)
    done = run_cli(tmp_path, *TINY, "trainer.steps=6", "trainer.checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    warning = next(ln for ln in out.splitlines() if "falling back" in ln)
    assert f"{damaged} is damaged: its SHA-256" in warning
    assert "resumed from " + str(tmp_path / "run" / "checkpoints" / "step_00000002") in out
    fault_case("damaged_byte_in_checkpoint", "one bit flipped inside a tensor of the newest checkpoint's "
               "model_optimizer.pt, `trainer.resume=auto`", exit_code=0,
               seen="warning: " + warning.split(" - ", 1)[-1])


def run_eval(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # The small grid first, so that a case's own --depths or --batch-size comes last and counts.
    return run_cli(tmp_path, "--lengths", "128", "--depths", "0.5", "--batches", "1", "--batch-size", "2",
                   "--no-progress", *args, module="nsa_dist.eval", timeout=240)


def eval_line(done: subprocess.CompletedProcess, code: int = 1) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith(("nsa_dist.eval: error: ", "python -m nsa_dist.eval: error: "))
    return lines[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case, prepare, args, code, expected", [
    ("eval_damaged_byte", flip_a_tensor_byte, (), 1, "is damaged: its SHA-256"),
    ("eval_truncated_file", _truncate, (), 1, "is damaged"),
    ("eval_random_file", lambda p: p.write_bytes(os.urandom(5000)), (), 1, "is damaged"),
    ("eval_model_optimizer_pt", None, ("MODEL_OPTIMIZER",), 1, "is not a trainer's final.pt"),
    ("eval_cuda_without_cuda", None, ("--device", "cuda"), 2, "no CUDA device is visible"),
    ("eval_depth_out_of_range", None, ("--depths", "1.5"), 2, "--depths are fractions of the context in [0, 1]"),
    ("eval_batch_size_zero", None, ("--batch-size", "0"), 2, "--batch-size must be at least 1"),
])
def test_eval_errors_are_one_line(old_run, tmp_path, fault_case, case, prepare, args, code, expected):
    if case == "eval_cuda_without_cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
    final = old_run / "final.pt"
    if prepare is not None:
        prepare(final)
    target = old_run / "checkpoints" / "step_00000002" / "model_optimizer.pt" if args == ("MODEL_OPTIMIZER",) \
        else final
    extra = () if args == ("MODEL_OPTIMIZER",) else args
    done = run_eval(tmp_path, str(target), *extra)
    line = eval_line(done, code)
    assert expected in line and "Traceback" not in done.stderr
    given = {"eval_damaged_byte": "one bit flipped inside a tensor of final.pt",
             "eval_truncated_file": "final.pt cut in half", "eval_random_file": "5000 random bytes as final.pt",
             "eval_model_optimizer_pt": "a checkpoint's model_optimizer.pt instead of final.pt"}.get(case)
    fault_case(case, f"`python -m nsa_dist.eval` on {given}" if given else f"`python -m nsa_dist.eval {' '.join(args)}`",
               exit_code=code, seen=line)


def test_eval_names_a_task_the_model_was_not_trained_on(old_run, tmp_path, fault_case):
    done = run_eval(tmp_path, str(old_run / "final.pt"), "--task", "needle")
    assert done.returncode == 0, done.stderr[-3000:]
    note = next(ln for ln in done.stderr.splitlines() if ln.startswith("note: "))
    assert "trained on data.kind=passkey, not needle" in note
    result = json.loads((old_run / "eval" / "retrieval_eval.json").read_text())
    assert result["trained_on"] == "passkey" and result["note"] in note
    fault_case("eval_task_not_trained", "`python -m nsa_dist.eval final.pt --task needle` of a passkey run",
               exit_code=0, seen=note)


def test_eval_reads_the_task_from_the_checkpoint(tmp_path):
    done = run_cli(tmp_path, *TINY, "data=needle", "trainer.steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = run_eval(tmp_path, str(tmp_path / "run" / "final.pt"))
    assert evaluated.returncode == 0 and "note:" not in evaluated.stderr, evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval" / "retrieval_eval.json").read_text())
    assert result["task"] == "needle" == result["trained_on"]
    assert "passkey_exact" not in (tmp_path / "run" / "train.log").read_text()


def test_export_names_a_damaged_final_pt(old_run, tmp_path, fault_case):
    flip_a_tensor_byte(old_run / "final.pt")
    done = run_cli(tmp_path, str(old_run / "final.pt"), str(tmp_path / "hf"), module="nsa_dist.export")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "is damaged: its SHA-256" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "hf").exists()
    fault_case("export_damaged_byte", "`python -m nsa_dist.export` on a final.pt with one bit flipped in a tensor",
               exit_code=1, seen=lines[0])
