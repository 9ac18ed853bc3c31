"""A run directory belongs to one run: a lock while a run writes, and no new run over an old one's files.

`check_run_dir` reads and never writes, so that a refused command leaves the directory as it found it;
`RunDirLock` is taken only once every check has passed. What counts as a run's files: its `final.pt`,
its finished checkpoints (under `trainer.checkpoint_dir` when set) and its `train_log.jsonl`. A run may
continue them (`trainer.resume=auto` or a checkpoint path, same config); anything else is refused unless
`trainer.move_old_run=true`, which renames the old files aside (`<dir>.moved-<time>`), never deletes them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path

from nsa_dist.training.checkpoint import CheckpointDir, checkpoint_root, compare_config
from nsa_dist.training.files import CheckpointError, load_file

log = logging.getLogger(__name__)

LOCK_NAME = ".nsa_dist.lock"


class RunDirError(RuntimeError):
    """The run directory holds another run, or another process is writing into it."""


def _ways_on(run_dir: Path, *, resumable: bool = True) -> str:
    resume = "continue it with trainer.resume=auto and its config, " if resumable else ""
    return (f"{resume}give this run a new hydra.run.dir, or move the old run aside with trainer.move_old_run=true "
            f"(it is renamed to {run_dir}.moved-<time>, not deleted)")


def _held_files(run_dir: Path, checkpoints: CheckpointDir) -> list[str]:
    held = []
    if (run_dir / "final.pt").is_file():
        held.append(str(run_dir / "final.pt"))
    finished = checkpoints.finished()
    if finished:
        held.append(f"{len(finished)} checkpoint(s) up to {finished[-1][1]}")
    if (run_dir / "train_log.jsonl").is_file():
        held.append(str(run_dir / "train_log.jsonl"))
    return held


def check_run_dir(run_dir: Path, trainer, config: dict) -> None:
    """Refuse, writing nothing, a run that would mix its files with another run's in `run_dir`.

    `config` is this run's checkpointed config sections (what a resume compares)."""
    run_dir = Path(run_dir)
    if str(run_dir) in ("", "."):
        raise RunDirError("hydra.run.dir is empty: the run would write into the working directory; "
                          "name a directory (hydra.run.dir=outputs/my_run) or leave the default")
    holder = LockHolder.read(run_dir / LOCK_NAME)
    if holder is not None and holder.alive() and not holder.is_this_process():
        raise RunDirError(f"{run_dir} is in use by another run ({holder}): wait for it to end or give this run "
                          f"another hydra.run.dir")
    if trainer.move_old_run:
        return
    checkpoints = CheckpointDir(checkpoint_root(trainer, run_dir), keep=trainer.checkpoint_keep)
    held = _held_files(run_dir, checkpoints)
    if not held:
        return
    if trainer.resume == "never":
        raise RunDirError(f"{run_dir} holds another run ({'; '.join(held)}) and trainer.resume=never would start a "
                          f"new one over it: {_ways_on(run_dir, resumable=bool(checkpoints.finished()))}")
    if trainer.resume != "auto":
        return  # a checkpoint named by path: the resume compares its config
    newest = _newest_config(checkpoints)
    if newest is None and checkpoints.finished():
        return  # every checkpoint damaged: the resume names each one
    if newest is None:
        raise RunDirError(f"{run_dir} holds a run that left no checkpoint to resume from ({'; '.join(held)}); a new "
                          f"run would replace it: {_ways_on(run_dir, resumable=False)}")
    path, saved = newest
    try:
        compare_config(saved, config, accept=trainer.resume_accept, path=path)
    except CheckpointError as e:
        raise RunDirError(f"{e}; or move the old run aside with trainer.move_old_run=true (it is renamed to "
                          f"{run_dir}.moved-<time>, not deleted)") from None


def _newest_config(checkpoints: CheckpointDir) -> tuple[Path, dict] | None:
    """The config of the newest checkpoint whose trainer.pt reads (a damaged one is the resume's to report)."""
    for _, path in reversed(checkpoints.finished()):
        try:
            state = load_file(path / "trainer.pt")
        except CheckpointError:
            continue
        return path, state.get("config", {})
    return None


def move_old_run(run_dir: Path, trainer) -> None:
    """`trainer.move_old_run=true`: rename the run directory (and an outside checkpoint directory) aside."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    outside = Path(trainer.checkpoint_dir).expanduser() if trainer.checkpoint_dir else None
    for directory in (run_dir, outside):
        if directory is None or not directory.is_dir() or not any(directory.iterdir()):
            continue
        if directory == outside and run_dir in directory.parents:
            continue  # moved with the run directory
        target = directory.with_name(f"{directory.name}.moved-{stamp}")
        os.replace(directory, target)
        moved.append(f"{directory} -> {target}")
    if moved:
        log.warning("trainer.move_old_run: moved the old run aside (%s)", "; ".join(moved))


class LockHolder:
    def __init__(self, pid: int, host: str, started: str):
        self.pid, self.host, self.started = pid, host, started

    @classmethod
    def read(cls, path: Path) -> "LockHolder | None":
        try:
            record = json.loads(path.read_text())
            return cls(int(record["pid"]), str(record["host"]), str(record.get("started", "?")))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, OSError):
            return cls(-1, "?", "?")  # unreadable: a crash mid-write, treated as held by nobody alive

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(os.getpid(), socket.gethostname(), datetime.now().isoformat(timespec="seconds"))

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder may still run; another host's process is assumed alive (it cannot be asked)."""
        if self.host != socket.gethostname():
            return self.host != "?"
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


class RunDirLock:
    """`<run_dir>/.nsa_dist.lock` (pid and host) while this process runs in `run_dir`; re-entrant."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.taken = False

    def held_here(self) -> bool:
        holder = LockHolder.read(self.path)
        return holder is not None and holder.is_this_process()

    def acquire(self) -> "RunDirLock":
        me = LockHolder.this_process()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = LockHolder.read(self.path)
                if holder is None:
                    continue
                if holder.is_this_process():
                    return self
                if holder.alive():
                    raise RunDirError(f"{self.path.parent} is in use by another run ({holder}): wait for it to end "
                                      "or give this run another hydra.run.dir") from None
                log.warning("%s: taking over the lock of a run that is gone (%s)", self.path.parent, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": me.pid, "host": me.host, "started": me.started}, f)
            self.taken = True
            return self
        raise RunDirError(f"could not take {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self.taken:
            self.path.unlink(missing_ok=True)
            self.taken = False

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
