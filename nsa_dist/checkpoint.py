"""Checkpoints that survive a crash mid-write and resume exactly.

Layout under `root`:

    root/step_00000100/          a finished checkpoint: model/optimizer files + trainer.pt + COMPLETE
    root/step_00000200.partial/  being written (or abandoned by a crash): never loaded

Every rank writes into the `.partial` directory; after a barrier rank 0 marks it `COMPLETE` and
renames it into place. A rename within one file system is atomic, so a crash at any moment
leaves the previous finished checkpoint as the newest one `latest()` finds.

`trainer.pt` holds what the model files do not (the step, the data loader's state) and
`rng_rank{r}.pt` every RNG of rank r (Python, NumPy, torch CPU and CUDA), so step k+1 after a
resume draws the same batch and the same dropout as the uninterrupted run.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointDir:
    """Finished checkpoints under `root`, newest by step; `keep` bounds how many stay on disk."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def finished(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / _COMPLETE).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        done = self.finished()
        return done[-1][1] if done else None

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict) -> Path:
        """Run `write(partial_dir)` on every rank, then publish the checkpoint atomically."""
        final = self.path(step)
        partial = final.with_name(final.name + ".partial")
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed attempt at this step
            partial.mkdir(parents=True)
        _barrier()
        write(partial)
        torch.save(rng_state(), partial / f"rng_rank{_rank()}.pt")
        if _is_main():
            torch.save({"step": step, **trainer_state}, partial / "trainer.pt")
        _barrier()
        if _is_main():
            (partial / _COMPLETE).write_text(f"{step}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for _, old in self.finished()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final


def load_trainer_state(path: Path, restore_rng: bool = True) -> dict:
    """The trainer state of a finished checkpoint; also puts back this rank's RNG streams."""
    path = Path(path)
    if not (path / _COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no {_COMPLETE} marker); "
                                "pick one that CheckpointDir.latest() returns")
    if restore_rng:
        set_rng_state(torch.load(path / f"rng_rank{_rank()}.pt", weights_only=False))
    return torch.load(path / "trainer.pt", weights_only=False)
