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
file whose pickle would build anything but tensors and plain containers is refused, not run, and every
file carries its SHA-256 beside it (`<file>.sha256`, nsa_dist.training.files), checked before it is read.
`TrainerCheckpoints` ties this to the training loop's engine, data source and mesh, falls back to the
previous finished checkpoint when the newest is damaged, and refuses a resume into a changed config.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from nsa_dist.training.files import (CheckpointError, DamagedCheckpointError, deepspeed_globals, digest_path,
                                     load_file, save_atomically, write_digest)

from nsa_dist.nn.build import build_model
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig

if TYPE_CHECKING:
    from nsa_dist.training.engine import TrainEngine
    from nsa_dist.parallel import Mesh

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_COMPLETE = "COMPLETE"
# The config sections a checkpoint carries and compares on resume. The mesh (parallel.dp_size/sp) is
# compared as built, since dp=null and dp=2 can name the same mesh.
CONFIG_SECTIONS = ("model", "nsa", "data", "parallel")
_MESH_KEYS = ("parallel.dp_size", "parallel.sp_size")
# Keys a resume may change on purpose (trainer.resume_accept): none of them changes a parameter's shape
# or what a rank's saved state means. data.* is accepted as a whole section.
ACCEPTABLE_CHANGES = ("data.*", "nsa.stride", "nsa.top_n", "nsa.num_init", "nsa.num_local", "nsa.backend",
                      "model.rope_theta", "model.norm_eps", "parallel.exchange", "parallel.fallback",
                      "parallel.check_inputs")


def run_sections(run) -> dict:
    """The sections of a RunConfig that a checkpoint carries and a resume compares."""
    return {name: dataclasses.asdict(getattr(run, name)) for name in CONFIG_SECTIONS}


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


def verify_checkpoint(path: Path) -> None:
    """Every file of a finished checkpoint matches its digest and opens with weights_only=True
    (memory-mapped: past the digest, the pickles and the zip directories are read, the tensor bytes are not)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth"))
    if not (path / "trainer.pt").is_file():
        raise DamagedCheckpointError(f"{path / 'trainer.pt'} is missing")
    for file in files:
        deepspeed_file = file.relative_to(path).parts[0] == "deepspeed"
        load_file(file, mmap=True, allowed=deepspeed_globals() if deepspeed_file else ())


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
        save_atomically(rng_state(), partial / f"rng_rank{_rank()}.pt")
        if _is_main():
            save_atomically({"step": step, **trainer_state}, partial / "trainer.pt")
        _barrier()
        if _is_main():
            # DeepSpeed writes its own files; their digests are taken here, once every rank has written.
            for file in partial.rglob("*.pt"):
                if not digest_path(file).is_file():
                    write_digest(file)
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


def checkpoint_root(trainer, run_dir: Path) -> Path:
    """Where a run's checkpoints go: `trainer.checkpoint_dir`, or `checkpoints/` in the run directory."""
    return Path(trainer.checkpoint_dir).expanduser() if trainer.checkpoint_dir else Path(run_dir) / "checkpoints"


def save_final(path: Path, model_state: dict, *, step: int, config: dict, extra: dict | None = None) -> Path:
    """A trainer's `final.pt`: the whole model's weights, the step and the run config it was trained with
    (`extra`: what else the plain torch path keeps, its optimizer and data state). Refuses non-finite
    weights; written atomically."""
    assert_finite(model_state.items(), str(path))
    save_atomically({"model": model_state, "step": step, "config": config, **(extra or {})}, Path(path))
    return Path(path)


def load_final(path: str | os.PathLike) -> dict:
    """The state of a trainer's `final.pt`, read with weights_only=True; raises naming the file when it is
    damaged or not a final.pt."""
    path = Path(path)
    state = load_file(path)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        held = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a trainer's final.pt: it holds {held}, not 'model' and 'config'")
    return state


def saved_section(config: dict, section: str, cls, **changes):
    """Section `section` of a saved run config as dataclass `cls` (with `changes`); settings this version
    does not know (a newer or older config) are named and left out."""
    values = {**config[section], **changes}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        log.warning("ignoring %s settings this version does not know: %s", section, ", ".join(unknown))
    return cls(**{k: v for k, v in values.items() if k in names})


def model_from_config(config: dict, *, backend: str | None = None) -> torch.nn.Module:
    """The model a saved run config's `model` and `nsa` sections describe (nsa_dist.nn.build.build_model);
    `backend` replaces its nsa.backend."""
    return build_model(saved_section(config, "model", ModelConfig),
                       saved_section(config, "nsa", NSAConfig, **({"backend": backend} if backend else {})))


def load_final_model(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                     backend: str | None = None) -> tuple[torch.nn.Module, dict, int | None]:
    """The model of a trainer's `final.pt` in eval mode on `device`, its run config, and its step.

    `backend` replaces the run's nsa.backend (e.g. "torch" to evaluate a GPU run on CPU)."""
    state = load_final(path)
    model = model_from_config(state["config"], backend=backend)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["config"], state.get("step")


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
            "start fresh in another hydra.run.dir, or with trainer.move_old_run=true (the old run is renamed aside)")
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
        f"{path} was trained with another config ({diffs}): start fresh in another hydra.run.dir (or "
        f"trainer.checkpoint_dir){hint} (acceptable: keys that keep parameter shapes, {', '.join(ACCEPTABLE_CHANGES)})")


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
            save_atomically(self.source.state_dict(), directory / f"data_rank{self.mesh.rank}.pt")

        return self.dir.save(step, write, {"mesh": [self.mesh.dp_size, self.mesh.sp_size], "config": self.config})

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
        mesh = [self.mesh.dp_size, self.mesh.sp_size]
        if list(state.get("mesh", [])) != mesh:
            raise ValueError(f"{path} was written by a dp x sp = {state.get('mesh')} mesh, this job has "
                             f"{mesh}: resume with the same parallel.dp_size / parallel.sp_size")
        if self.config and "config" in state:
            compare_config(state["config"], self.config, accept=self.accept, path=path)
        elif self.config:
            log.warning("%s carries no config (written by an older nsa_dist); not compared with this run's", path)
        self.engine.load(path)
        self.source.load_state_dict(load_file(path / f"data_rank{self.mesh.rank}.pt"))
        # Last, so that nothing loaded above can draw from the restored streams.
        restore_rng_state(path)
        return int(state["step"])
