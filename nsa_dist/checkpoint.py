"""Checkpoints that survive a crash mid-write, load only plain data, and resume exactly.

Layout under `root`:

    root/step_00000100/          a finished checkpoint: model/optimizer files + trainer.pt + COMPLETE
    root/step_00000200.partial/  being written (or abandoned by a crash): never loaded

Every rank writes into the `.partial` directory; after a barrier rank 0 marks it `COMPLETE`,
renames it into place, and only then removes the checkpoints beyond `keep`. A rename within one file
system is atomic, so a crash at any moment leaves the previous finished checkpoint as the newest one.

`trainer.pt` holds what the model files do not (the step, the mesh, the model/nsa/data/parallel
config), `data_rank{r}.pt` rank r's place in its data stream and `rng_rank{r}.pt` every RNG of rank r
(Python, NumPy, torch CPU and CUDA, all as tensors and plain values), so step k+1 after a resume draws
the same batch as the uninterrupted run. Every file is read with `torch.load(weights_only=True)`: a
file whose pickle would build anything but tensors and plain containers is refused, not run.
`TrainerCheckpoints` ties this to the training loop's engine, data source and mesh, falls back to the
previous finished checkpoint when the newest is damaged, and refuses a resume into a changed config.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nsa_dist.engine import TrainEngine
    from nsa_dist.parallel import Mesh

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_COMPLETE = "COMPLETE"
# The config sections a checkpoint carries and compares on resume. The mesh (parallel.dp/sp) is
# compared as built, since dp=null and dp=2 can name the same mesh.
CONFIG_SECTIONS = ("model", "nsa", "data", "parallel")
_MESH_KEYS = ("parallel.dp", "parallel.sp")
# Keys a resume may change on purpose (trainer.resume_accept): none of them changes a parameter's shape
# or what a rank's saved state means. data.* is accepted as a whole section.
ACCEPTABLE_CHANGES = ("data.*", "nsa.stride", "nsa.top_n", "nsa.num_init", "nsa.num_local", "nsa.backend",
                      "model.rope_theta", "model.norm_eps", "parallel.exchange", "parallel.fallback",
                      "parallel.check_inputs")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, unsafe, or written by another config."""


class UnsafeCheckpointError(CheckpointError):
    pass


class DamagedCheckpointError(CheckpointError):
    pass


def _matches(key: str, patterns: Iterable[str]) -> bool:
    """Whether `key` is one of `patterns`, or its section's `<section>.*` is."""
    return key in patterns or f"{key.split('.')[0]}.*" in patterns


def acceptable_change(key: str) -> bool:
    return _matches(key, ACCEPTABLE_CHANGES)


def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Plain-data classes DeepSpeed's optimizer files pickle (its ZeRO partitions' bookkeeping); allowed for the
# files under deepspeed/ only, beside what weights_only=True allows everywhere.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


def _deepspeed_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_GLOBALS]


def load_file(path: Path, *, map_location: str = "cpu", mmap: bool = False, allowed: list = ()) -> Any:
    """`torch.load(path, weights_only=True)`, naming the file when it is refused or cannot be read."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: [^\n]*?)(?: was not|\.?\n|$)", str(e))
        reason = found.group(1) if found else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(f"{path} holds more than tensors and plain values ({reason}); refused unread: "
                                    "delete that checkpoint or set trainer.resume=never") from e
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"{path} is missing") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(f"{path} is damaged or truncated ({reason})") from e


def verify_checkpoint(path: Path) -> None:
    """Every file of a finished checkpoint opens with weights_only=True (memory-mapped: the pickles and
    the zip directories are read, the tensor bytes are not)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth"))
    if not (path / "trainer.pt").is_file():
        raise DamagedCheckpointError(f"{path / 'trainer.pt'} is missing")
    for file in files:
        deepspeed_file = file.relative_to(path).parts[0] == "deepspeed"
        load_file(file, mmap=True, allowed=_deepspeed_globals() if deepspeed_file else ())


def assert_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to write a state that holds NaN or inf: a checkpoint must always be a state worth resuming."""
    for name, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel() \
                and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"not saving {what}: {name} holds non-finite values")


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
            # Only now, with the new checkpoint finished and in place, may the oldest go.
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
    return load_file(path / "trainer.pt")


def restore_rng_state(path: Path) -> None:
    set_rng_state(load_file(Path(path) / f"rng_rank{_rank()}.pt"))


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_to_resume(resume: str, checkpoints: CheckpointDir) -> Path | None:
    """The checkpoint `trainer.resume` names, checked: auto (the newest intact finished one, warning about
    each damaged one passed over), never, or a path (which must be intact)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"trainer.resume={resume!r} is not a checkpoint directory: pass one of "
                                    f"{[str(p) for _, p in checkpoints.finished()] or '(none under ' + str(checkpoints.root) + ')'}, "
                                    "auto or never")
        verify_checkpoint(path)
        return path
    damaged = []
    for _, path in reversed(checkpoints.finished()):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as e:
            damaged.append(path)
            log.warning("%s; falling back to the previous finished checkpoint", e)
            continue
        return path
    if damaged:
        raise DamagedCheckpointError(
            f"every finished checkpoint under {checkpoints.root} is damaged ({', '.join(str(p) for p in damaged)}): "
            "start fresh with trainer.resume=never or another trainer.checkpoint_dir")
    return None


def flatten_config(sections: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def compare_config(saved: dict, current: dict, *, accept: Iterable[str], path: Path) -> None:
    """Raise naming each key whose value differs between the checkpoint and this run, unless accepted."""
    saved_flat, current_flat = flatten_config(saved), flatten_config(current)
    keys = sorted((set(saved_flat) | set(current_flat)) - set(_MESH_KEYS))
    changed = [k for k in keys if saved_flat.get(k, "absent") != current_flat.get(k, "absent")]
    accept = set(accept)
    refused = [k for k in changed if not _matches(k, accept)]
    for key in changed:
        if key not in refused:
            log.warning("resuming %s with %s changed (%r -> %r), accepted by trainer.resume_accept", path, key,
                        saved_flat.get(key), current_flat.get(key))
    if not refused:
        return
    diffs = "; ".join(f"{k}: checkpoint {saved_flat.get(k, 'absent')}, this run {current_flat.get(k, 'absent')}"
                      for k in refused)
    acceptable = [k for k in refused if acceptable_change(k)]
    hint = (f", or keep the change on purpose with trainer.resume_accept=[{','.join(acceptable)}]" if acceptable
            else "")
    raise CheckpointError(
        f"{path} was trained with another config ({diffs}): start fresh with trainer.resume=never or another "
        f"trainer.checkpoint_dir{hint} (acceptable: keys that keep parameter shapes, {', '.join(ACCEPTABLE_CHANGES)})")


class TrainerCheckpoints:
    """Saves and restores everything a step depends on: weights, optimizer, data positions, RNG streams."""

    def __init__(self, root: Path, keep: int, *, engine: "TrainEngine", source, mesh: "Mesh",
                 config: dict | None = None, accept: Iterable[str] = ()):
        self.dir = CheckpointDir(root, keep=keep)
        self.engine, self.source, self.mesh = engine, source, mesh
        self.config = config or {}
        self.accept = tuple(accept)

    def save(self, step: int) -> Path:
        module = getattr(self.engine, "module", None)
        if module is not None:
            assert_finite(module.state_dict().items(), f"the checkpoint of step {step}")

        def write(directory: Path) -> None:
            self.engine.save(directory)
            # Each data-parallel replica is at its own place in its own stream.
            torch.save(self.source.state_dict(), directory / f"data_rank{self.mesh.rank}.pt")

        return self.dir.save(step, write, {"mesh": [self.mesh.dp, self.mesh.sp], "config": self.config})

    def resume(self, resume: str) -> tuple[int, Path | None]:
        """Restore what `trainer.resume` names; the step to start from and the checkpoint (None: fresh)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            path = checkpoint_to_resume(resume, self.dir)
        else:
            # Rank 0 decides (on a shared file system another node may not see the newest checkpoint yet)
            # and every rank raises the same error, instead of the others waiting in the broadcast.
            choice: list = [None, None]
            if dist.get_rank() == 0:
                try:
                    choice[0] = checkpoint_to_resume(resume, self.dir)
                except (CheckpointError, FileNotFoundError) as e:
                    choice[1] = (type(e).__name__, str(e))
            dist.broadcast_object_list(choice, src=0)
            path, failure = choice
            if failure is not None:
                kind, message = failure
                raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(message)
        return (0, None) if path is None else (self.restore(path), path)

    def restore(self, path: Path) -> int:
        """Load `path`; returns its step, the number of steps already taken."""
        state = load_trainer_state(path, restore_rng=False)
        mesh = [self.mesh.dp, self.mesh.sp]
        if list(state.get("mesh", [])) != mesh:
            raise ValueError(f"{path} was written by a dp x sp = {state.get('mesh')} mesh, this job has "
                             f"{mesh}: resume with the same parallel.dp / parallel.sp")
        if self.config and "config" in state:
            compare_config(state["config"], self.config, accept=self.accept, path=path)
        elif self.config:
            log.warning("%s carries no config (written by an older nsa_dist); not compared with this run's", path)
        self.engine.load(path)
        self.source.load_state_dict(load_file(path / f"data_rank{self.mesh.rank}.pt"))
        # Last, so that nothing loaded above can draw from the restored streams.
        restore_rng_state(path)
        return int(state["step"])
