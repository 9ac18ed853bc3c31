"""Checkpoints that survive a crash mid-write and resume exactly.

Layout under `root`:

    root/step_00000100/          a finished checkpoint: model/optimizer files + trainer.pt + COMPLETE
    root/step_00000200.partial/  being written (or abandoned by a crash): never loaded

Every rank writes into the `.partial` directory; after a barrier rank 0 marks it `COMPLETE` and
renames it into place. A rename within one file system is atomic, so a crash at any moment
leaves the previous finished checkpoint as the newest one `latest()` finds.

`trainer.pt` holds what the model files do not (the step, the mesh), `data_rank{r}.pt` rank r's
place in its data stream and `rng_rank{r}.pt` every RNG of rank r (Python, NumPy, torch CPU and
CUDA), so step k+1 after a resume draws the same batch and the same dropout as the uninterrupted run.
`TrainerCheckpoints` ties this to the training loop's engine, data source and mesh.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nsa_dist.engine import TrainEngine
    from nsa_dist.parallel import Mesh

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
    """The trainer state of a finished checkpoint; with `restore_rng`, also puts back this rank's RNG streams."""
    path = Path(path)
    if not (path / _COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no {_COMPLETE} marker); "
                                "pick one that CheckpointDir.latest() returns")
    if restore_rng:
        restore_rng_state(path)
    return torch.load(path / "trainer.pt", weights_only=False)


def restore_rng_state(path: Path) -> None:
    set_rng_state(torch.load(Path(path) / f"rng_rank{_rank()}.pt", weights_only=False))


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_to_resume(resume: str, checkpoints: CheckpointDir) -> Path | None:
    """The checkpoint `trainer.resume` names: auto (the latest finished one, if any), never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoints.latest()
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume!r} is not a checkpoint directory: pass one of "
                                f"{[str(p) for _, p in checkpoints.finished()] or 'none found'}, auto or never")
    return path


class TrainerCheckpoints:
    """Saves and restores everything a step depends on: weights, optimizer, data positions, RNG streams."""

    def __init__(self, root: Path, keep: int, *, engine: "TrainEngine", source, mesh: "Mesh"):
        self.dir = CheckpointDir(root, keep=keep)
        self.engine, self.source, self.mesh = engine, source, mesh

    def save(self, step: int) -> Path:
        def write(directory: Path) -> None:
            self.engine.save(directory)
            # Each data-parallel replica is at its own place in its own stream.
            torch.save(self.source.state_dict(), directory / f"data_rank{self.mesh.rank}.pt")

        return self.dir.save(step, write, {"mesh": [self.mesh.dp, self.mesh.sp]})

    def resume(self, resume: str) -> tuple[int, Path | None]:
        """Restore what `trainer.resume` names; the step to start from and the checkpoint (None: fresh)."""
        path = checkpoint_to_resume(resume, self.dir)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Rank 0 decides: on a shared file system another node may not see the newest checkpoint yet.
            choice = [path]
            dist.broadcast_object_list(choice, src=0)
            path = choice[0]
        return (0, None) if path is None else (self.restore(path), path)

    def restore(self, path: Path) -> int:
        """Load `path`; returns its step, the number of steps already taken."""
        state = load_trainer_state(path, restore_rng=False)
        mesh = [self.mesh.dp, self.mesh.sp]
        if list(state.get("mesh", [])) != mesh:
            raise ValueError(f"{path} was written by a dp x sp = {state.get('mesh')} mesh, this job has "
                             f"{mesh}: resume with the same parallel.dp / parallel.sp")
        self.engine.load(path)
        self.source.load_state_dict(torch.load(path / f"data_rank{self.mesh.rank}.pt", weights_only=False))
        # Last, so that nothing loaded above can draw from the restored streams.
        restore_rng_state(path)
        return int(state["step"])
