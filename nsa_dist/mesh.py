"""The data-parallel x sequence-parallel mesh of a job, built once from the initialised world.

Ranks are laid out dp-major: `rank = dp_rank * sp + sp_rank`, so the ranks that share one sequence
are contiguous (one host, under any launcher that numbers ranks node by node) and the data-parallel
replicas stride across hosts. The model takes `mesh.sequence_parallel` (None for sp = 1) and the data
loader takes `mesh.dp_rank`; nothing reads the mesh from a global.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from nsa_dist.distributed import DistributedContext
from nsa_dist.parallel import EXCHANGES, SequenceParallel


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel` config section: degrees and how selected K/V blocks travel."""

    dp: int | None = None  # None: world size / sp
    sp: int = 1
    exchange: str = "all_to_all"  # all_to_all | ring | all_gather (the plain context-parallel baseline)
    fallback: bool = True  # per step, use the all-gather when the exchange would move more bytes
    check_inputs: bool = True  # a small all-gather per layer call that catches mismatched shards

    def validate(self) -> "ParallelConfig":
        if self.sp < 1:
            raise ValueError(f"parallel.sp must be at least 1, got {self.sp}")
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"parallel.dp must be at least 1 (or null: world size / parallel.sp), got {self.dp}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown parallel.exchange={self.exchange!r}: choose one of {EXCHANGES}")
        return self

    def degrees(self, world_size: int) -> tuple[int, int]:
        """`(dp, sp)` for a job of `world_size` ranks; raises ValueError naming the fix if they do not fit."""
        dp = self.dp if self.dp is not None else world_size // self.sp
        if dp * self.sp != world_size or dp < 1:
            given = f"parallel.dp={self.dp} x " if self.dp is not None else ""
            fits = [s for s in range(1, world_size + 1) if world_size % s == 0]
            raise ValueError(f"{given}parallel.sp={self.sp} does not fit a job of {world_size} rank(s): dp x sp must "
                             f"equal the world size; use parallel.sp in {fits} with parallel.dp=null "
                             f"(or dp = {world_size} / sp), or launch dp x sp ranks")
        return dp, self.sp


@dataclass(frozen=True)
class Mesh:
    dp: int
    sp: int
    dp_rank: int = 0
    sp_rank: int = 0
    dp_group: Any = None  # a ProcessGroup over the ranks holding the same sequence shard; None when dp = 1
    sp_group: Any = None  # a ProcessGroup over the ranks of one replica; None when sp = 1
    sequence_parallel: SequenceParallel | None = None

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    @property
    def rank(self) -> int:
        return self.dp_rank * self.sp + self.sp_rank


SINGLE_RANK_MESH = Mesh(dp=1, sp=1)


def build_mesh(cfg: ParallelConfig, ctx: DistributedContext) -> Mesh:
    """The mesh of this job. A collective over the whole world: every rank calls it, in the same order."""
    dp, sp = cfg.validate().degrees(ctx.world_size)
    if not ctx.is_distributed:
        return SINGLE_RANK_MESH
    dp_rank, sp_rank = divmod(ctx.rank, sp)
    # new_group is itself a world collective: every rank creates every group, in one order.
    sp_group = dp_group = None
    if sp > 1:
        for replica in range(dp):
            group = dist.new_group(list(range(replica * sp, (replica + 1) * sp)))
            if replica == dp_rank:
                sp_group = group
    if dp > 1:
        for position in range(sp):
            group = dist.new_group(list(range(position, dp * sp, sp)))
            if position == sp_rank:
                dp_group = group
    sequence_parallel = None
    if sp > 1:
        sequence_parallel = SequenceParallel(group=sp_group, exchange=cfg.exchange, fallback=cfg.fallback,
                                             check_inputs=cfg.check_inputs)
    return Mesh(dp=dp, sp=sp, dp_rank=dp_rank, sp_rank=sp_rank, dp_group=dp_group, sp_group=sp_group,
                sequence_parallel=sequence_parallel)
