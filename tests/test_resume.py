"""Resuming continues exactly: the plain torch path in one process, and a rank killed with SIGKILL mid-run
whose relaunch resumes from the last checkpoint (two ranks started by torch's elastic agent from the CLI,
`launcher=torchrun`, DeepSpeed ZeRO-2 on CPU).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsa_dist.train import main

STEPS, EVERY = 24, 4
RUN = ["launcher=torchrun", "launcher.nproc_per_node=2", "launcher.timeout_s=120", "zero=stage2",
       "model.num_layers=1", "trainer.batch_size=2", "data.seq_len=256", "trainer.eval_every=0",
       "trainer.eval_batch_size=2", "trainer.progress_bar=false", "trainer.device=cpu",
       f"trainer.steps={STEPS}", f"trainer.checkpoint_every={EVERY}"]


def launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "nsa_dist.train", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_losses(run_dir: Path) -> list[dict]:
    """The complete lines of rank 0's step log (the last one may be mid-write while the run goes on)."""
    path = run_dir / "train_log.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_plain_torch_resume_redraws_the_same_batches(compose_config, tmp_path):
    steps = ["model.num_layers=1", "trainer.batch_size=2", "data.seq_len=256", "trainer.eval_every=0",
             "trainer.eval_batch_size=2", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.steps=4"]
    whole = main(compose_config(*steps, "trainer.checkpoint_every=2"), run_dir=tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000002"
    resumed = main(compose_config(*steps, f"trainer.resume={checkpoint}"), run_dir=tmp_path / "resumed")
    assert resumed.start_step == 2 and resumed.resumed_from == checkpoint
    assert resumed.losses == whole.losses[2:]
    over_whole = (*steps, "trainer.resume=never", f"trainer.checkpoint_dir={tmp_path / 'whole' / 'checkpoints'}")
    # A new run over another run's checkpoints would rotate them away: refused, unless they are moved aside.
    with pytest.raises(RuntimeError, match="trainer.move_old_run=true"):
        main(compose_config(*over_whole), run_dir=tmp_path / "fresh")
    fresh = main(compose_config(*over_whole, "trainer.move_old_run=true"), run_dir=tmp_path / "fresh")
    assert fresh.start_step == 0 and fresh.losses == whole.losses
    assert (next((tmp_path / "whole").glob("checkpoints.moved-*")) / "step_00000004" / "COMPLETE").is_file()


def test_kill_one_rank_then_relaunch_resumes_from_the_last_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    code, out = finish(launch(reference_dir))
    assert code == 0, out[-4000:]
    reference = {row["step"]: row["loss"] for row in logged_losses(reference_dir)}
    assert sorted(reference) == list(range(STEPS))

    proc = launch(run_dir)
    first_checkpoint = run_dir / "checkpoints" / f"step_{EVERY:08d}"
    deadline = time.monotonic() + 240
    # Kill mid-interval, a step or two past the checkpoint, so the relaunch has steps to redo.
    while not (first_checkpoint / "COMPLETE").exists() or len(logged_losses(run_dir)) < EVERY + 2:
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    ranks = json.loads((run_dir / "distributed.json").read_text())["ranks"]
    os.kill(next(r["pid"] for r in ranks if r["rank"] == 1), signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, "the job should fail when one of its ranks is killed"
    before = logged_losses(run_dir)
    completed = before[-1]["step"] + 1
    assert completed < STEPS, "the kill came too late to test anything"

    code, out = finish(launch(run_dir, "trainer.resume=auto"))
    assert code == 0, out[-4000:]
    logged = logged_losses(run_dir)
    # The steps redone after the checkpoint replace their records from before the kill: each step once.
    assert [row["step"] for row in logged] == list(range(STEPS))
    resumed_at = int(re.search(r"resumed from \S+/step_(\d{8})", out).group(1))
    assert resumed_at % EVERY == 0 and 0 <= completed - resumed_at <= EVERY, \
        f"{completed} steps were done before the kill, the relaunch started at {resumed_at}"
    after = logged[resumed_at:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{resumed_at:08d}'}" in out
    for row in after:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-6, abs=1e-7), f"step {row['step']}"
