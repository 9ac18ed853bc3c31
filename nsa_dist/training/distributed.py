"""The process group of one job and the few collectives the trainer makes outside the model.

`init_process_group(...)` joins the group the environment describes (`RANK`, `WORLD_SIZE`,
`MASTER_*`, as torchrun, Slurm through nsa_dist.launch.slurm, or nsa_dist.launch leaves them) and
returns a `DistributedContext` that the training loop takes explicitly; without `RANK` it is one
process and no group. Starting ranks is nsa_dist.launch's job, not this module's.

Groups passed to the collectives below follow torch's and the mesh's convention: None is the default
group (the whole world); a group of one rank, or no process group at all, makes them no-ops.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job; world_size 1 means no process group was made."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    started_by: str = "local"  # local | torchrun | ray | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()


def init_process_group(*, backend: str = "auto", timeout_s: float = 600.0, device: str = "auto",
                       run_dir: Path | None = None) -> DistributedContext:
    """Join the group the environment describes; rank 0 writes `distributed.json` to run_dir.

    `backend` auto is NCCL when `device` (trainer.device) trains on CUDA, gloo otherwise.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        uses_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        backend = backend if backend != "auto" else ("nccl" if uses_cuda else "gloo")
        ctx = _join(backend, timeout_s=timeout_s, started_by=env.get("NSA_DIST_STARTED_BY", "torchrun"))
    else:
        ctx = SINGLE_PROCESS
    if run_dir is not None:
        _record_membership(ctx, Path(run_dir))
    return ctx


def destroy_process_group(ctx: DistributedContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Every rank starts from rank 0's weights, whatever its own initialisation drew."""
    if not ctx.is_distributed:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, src=0)


def _alone(group: Any) -> bool:
    return not dist.is_initialized() or dist.get_world_size(group) == 1


def average_gradients(model: torch.nn.Module, group: Any) -> None:
    """Replace each gradient by its mean over `group` (None: the world), in one flat all-reduce."""
    if _alone(group):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_across_ranks(value: torch.Tensor, group: Any) -> float:
    """The mean of a scalar over `group` (None: the world), as a Python float (a host sync)."""
    if _alone(group):
        return float(value)
    total = value.detach().clone().float().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return float(total) / dist.get_world_size(group)


def _join(backend: str, *, timeout_s: float, started_by: str) -> DistributedContext:
    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    if world_size == 1:
        return DistributedContext(started_by=started_by)
    if "OMP_NUM_THREADS" not in env:
        # Ranks sharing a host would each take a thread per core; oversubscribed, the spinning
        # OpenMP threads slow CPU training by an order of magnitude.
        ranks_here = int(env.get("LOCAL_WORLD_SIZE", 1))
        per_rank = int(env.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1) // ranks_here
        torch.set_num_threads(max(1, per_rank))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("launcher.backend=nccl needs CUDA devices and none is visible: use gloo")
        # A launcher that narrows CUDA_VISIBLE_DEVICES to one GPU per rank (Ray, Slurm gpus-per-task)
        # leaves that GPU as device 0; otherwise the local rank picks it.
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > 1 else 0)
    master_addr = env.get("MASTER_ADDR", "")
    one_host = int(env.get("LOCAL_WORLD_SIZE", world_size)) == world_size
    if one_host and _is_loopback(master_addr):
        # gloo otherwise listens on whatever the hostname resolves to, which may not be loopback.
        # Only when every rank is here: Debian maps a node's own name to 127.0.1.1, which would
        # pin rank 0 of a multi-node job to an interface the other nodes cannot reach.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    log.info("rank %d of %d joining the %s group at %s:%s (started by %s)", rank, world_size, backend,
             master_addr, env.get("MASTER_PORT", "?"), started_by)
    if dist.is_initialized():
        backend = dist.get_backend()  # the caller made the group already; join it as it is
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    if rank != 0:
        # Rank 0 speaks for the job; the others report only problems.
        logging.getLogger().setLevel(logging.WARNING)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                              started_by=started_by)


def _record_membership(ctx: DistributedContext, run_dir: Path) -> None:
    """Every rank reports host and pid through the group; rank 0 writes them, proof the group formed."""
    me = {"rank": ctx.rank, "host": socket.gethostname(), "pid": os.getpid()}
    members = [me]
    if ctx.is_distributed:
        members = [None] * ctx.world_size
        dist.all_gather_object(members, me)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"world_size": ctx.world_size, "backend": ctx.backend, "started_by": ctx.started_by,
                  "ranks": members}
        tmp = run_dir / "distributed.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, run_dir / "distributed.json")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"
