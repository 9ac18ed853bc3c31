"""Starting the ranks of one job: the environment in, one call per rank out.

`start_ranks(launcher, entry, *args, device=..., run_dir=...)` returns `entry(*args)` run on every
rank the `launcher` section asks for, and rank 0's result:

- `launcher=local`, or a process that is already a rank (`torchrun`, a Slurm task, a rank this
  package started): `entry(*args)` here, once. A Slurm task first gets RANK, WORLD_SIZE and MASTER_*
  from `SLURM_*` (nsa_dist.launch.slurm).
- `launcher=torchrun`: torch's elastic agent starts this node's ranks (nsa_dist.launch.elastic).
- `launcher=ray`: Ray actors in a placement group (nsa_dist.launch.ray_actors).

Nothing here trains or joins a process group: each rank's `entry` does that from the environment
(nsa_dist.training.distributed.init_process_group). The shell scripts beside this package (torchrun.sh,
slurm.sbatch, ray.sh) only set that environment and run `python -m nsa_dist.train`.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from nsa_dist.launch import slurm
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.launch.elastic import start_elastic_ranks
from nsa_dist.launch.ray_actors import start_ray_ranks

__all__ = ["LauncherConfig", "planned_world_size", "start_ranks", "started_by"]


def started_by(launcher: LauncherConfig) -> str | None:
    """Who started this process as a rank (torchrun, ray, slurm), or None if nobody did."""
    if launcher.kind == "slurm" and slurm.in_slurm_task():
        return "slurm"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return os.environ.get("NSA_DIST_STARTED_BY", "torchrun")
    return None


def planned_world_size(launcher: LauncherConfig) -> int | None:
    """How many ranks the job will have, known before any starts (None: only the ranks will know)."""
    by = started_by(launcher)
    if by == "slurm":
        return int(os.environ.get("SLURM_NTASKS", 0)) or None
    if by is not None:
        return int(os.environ["WORLD_SIZE"])
    if launcher.kind == "local":
        return 1
    if launcher.kind == "torchrun":
        return launcher.nproc_per_node * launcher.nnodes
    if launcher.kind == "ray":
        return launcher.num_workers
    return None


def start_ranks(launcher: LauncherConfig, entry: Callable[..., Any], *args: Any, device: str = "auto",
                run_dir: Path) -> Any:
    """Run `entry(*args)` on every rank of the job and return rank 0's result.

    `device` is the trainer's (auto | cpu | cuda): it decides whether each rank takes a GPU. Fails
    before starting anything when the request cannot be met (more ranks than devices or cluster, no
    cluster at the address, launcher=slurm outside a Slurm job).
    """
    by = started_by(launcher)
    if by == "slurm":
        slurm.export_rendezvous()
    if by is not None or launcher.kind == "local":
        return entry(*args)
    entry = _importable(entry)
    if launcher.kind == "slurm":
        raise RuntimeError("launcher=slurm runs each rank as a Slurm task, and this process is not in a Slurm "
                           "job: submit with --multirun (Hydra's submitit launcher) or `sbatch launch/slurm.sbatch`")
    if launcher.kind == "torchrun":
        return start_elastic_ranks(launcher, entry, args, device=device, run_dir=run_dir)
    return start_ray_ranks(launcher, entry, args, device=device, run_dir=run_dir)


def _importable(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Under `python -m pkg.mod`, `entry` lives in __main__, which other processes cannot import by that name."""
    if getattr(entry, "__module__", None) != "__main__":
        return entry
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        return entry
    return getattr(importlib.import_module(spec.name), entry.__qualname__, entry)
