"""The job's data-parallel x sequence-parallel mesh, and the sequence-parallel group handle.

Ranks are laid out dp-major: `rank = dp_rank * sp + sp_rank`, so the ranks that share one sequence
are contiguous (one host, under any launcher that numbers ranks node by node) and the data-parallel
replicas stride across hosts. The model takes `mesh.sequence_parallel` (None for sp = 1) and the data
loader takes `mesh.dp_rank`; nothing reads the mesh from a global.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from .collectives import collective_device

EXCHANGES = ("all_to_all", "ring", "all_gather")

@dataclass(frozen=True)
class SequenceParallel:
    """`P = size` ranks that share one sequence, rank `r` holding zigzag chunks `r` and `2P-1-r`.

    An immutable handle: the group and how the layer uses it. What changes per step (the byte counts
    of each call, the index plans) lives with the caller: an `ExchangeLog` and each layer's
    `PlanCache`. To change an option, build a new one (`dataclasses.replace(sp, exchange="ring")`,
    which validates again: a collective like construction).

    `exchange` picks how selected remote K/V blocks travel: "all_to_all" (one uneven
    `all_to_all_single`), "ring" (`P-1` point-to-point steps `r -> r+s`) or "all_gather" (every
    rank gathers all K/V: the plain context-parallel baseline). With `fallback`, the first two
    switch to the all-gather for a step whose busiest rank would receive at least as many bytes
    as the all-gather moves. `validate` checks at construction that every rank of the group built it
    from the same group (a collective over the whole world: every rank must construct its
    `SequenceParallel` together); `check_inputs` checks at every layer call that the ranks pass
    shards of one sequence with one config (a tiny all-gather and a host sync; turn it off once the
    input pipeline is trusted).
    """

    group: Any = None  # a ProcessGroup; None = the default (world) group
    exchange: str = "all_to_all"
    fallback: bool = True
    validate: bool = True
    check_inputs: bool = True
    rank: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs an initialised torch.distributed process group; call "
                               "torch.distributed.init_process_group first")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange={self.exchange!r}: choose one of {EXCHANGES}")
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it was "
                             "given; pass the sequence-parallel group that contains it")
        object.__setattr__(self, "rank", rank)  # frozen: computed once, here
        object.__setattr__(self, "size", dist.get_world_size(self.group))
        if self.validate:
            self._check_same_group_everywhere()

    def __deepcopy__(self, memo):
        return self  # immutable, and its process group cannot be copied: a copied model shares the handle

    @property
    def global_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD)

    def global_rank(self, group_rank: int) -> int:
        return self.global_ranks[group_rank]

    def _check_same_group_everywhere(self):
        world = dist.get_world_size()
        mine = torch.full((world,), -1, dtype=torch.int64)
        mine[: self.size] = torch.tensor(self.global_ranks, dtype=torch.int64)
        device = collective_device(None)
        views = [torch.empty(world, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(views, mine.to(device))  # host sync: once, at construction
        views = [[r for r in v.tolist() if r >= 0] for v in views]
        me = dist.get_rank()
        for other, members in enumerate(views):
            claims_me = me in members
            i_claim = other in views[me]
            if (claims_me or i_claim) and members != views[me]:
                raise ValueError(f"the sequence-parallel group differs across ranks: global rank {me} has group "
                                 f"{views[me]} but global rank {other} has {members}; every rank of a "
                                 "sequence-parallel group must pass the same group (build it once with "
                                 "torch.distributed.new_group on all ranks, in the same order)")


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel` config section: degrees and how selected K/V blocks travel."""

    dp_size: int | None = None  # None: world size / sp_size
    sp_size: int = 1
    exchange: str = "all_to_all"  # all_to_all | ring | all_gather (the plain context-parallel baseline)
    fallback: bool = True  # per step, use the all-gather when the exchange would move more bytes
    check_inputs: bool = True  # a small all-gather per layer call that catches mismatched shards
    # wall time of each collective into the ExchangeLog (comm/*_s); a device sync around each one
    time_collectives: bool = False

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "ParallelConfig":
        if self.sp_size < 1:
            raise ValueError(f"parallel.sp_size must be at least 1, got {self.sp_size}")
        if self.dp_size is not None and self.dp_size < 1:
            raise ValueError(f"parallel.dp_size must be at least 1 (or null: world size / parallel.sp_size), got {self.dp_size}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown parallel.exchange={self.exchange!r}: choose one of {EXCHANGES}")
        return self

    def degrees(self, world_size: int) -> tuple[int, int]:
        """`(dp, sp)` for a job of `world_size` ranks; raises ValueError naming the fix if they do not fit."""
        dp = self.dp_size if self.dp_size is not None else world_size // self.sp_size
        if dp * self.sp_size != world_size or dp < 1:
            given = f"parallel.dp_size={self.dp_size} x " if self.dp_size is not None else ""
            fits = [s for s in range(1, world_size + 1) if world_size % s == 0]
            raise ValueError(f"{given}parallel.sp_size={self.sp_size} does not fit a job of {world_size} rank(s): dp x sp must "
                             f"equal the world size; use parallel.sp_size in {fits} with parallel.dp_size=null "
                             f"(or dp = {world_size} / sp), or launch dp x sp ranks")
        return dp, self.sp_size


@dataclass(frozen=True)
class Mesh:
    dp_size: int
    sp_size: int
    dp_rank: int = 0
    sp_rank: int = 0
    # ProcessGroups; None is torch's default group, the whole world (one rank in SINGLE_RANK_MESH)
    dp_group: Any = None  # over the ranks holding the same sequence shard
    sp_group: Any = None  # over the ranks of one replica
    sequence_parallel: SequenceParallel | None = None
    device_mesh: Any = None  # the torch DeviceMesh ("dp", "sp") it was built from; None on one rank

    @property
    def world_size(self) -> int:
        return self.dp_size * self.sp_size

    @property
    def rank(self) -> int:
        return self.dp_rank * self.sp_size + self.sp_rank

    @property
    def grad_group(self):
        """The group over which parameter gradients are averaged: all dp x sp ranks, not only the dp group
        (the sp ranks of one replica each backpropagate their own tokens through the same weights, so
        each holds a partial gradient of every parameter). The mesh spans the whole world, so this is
        None, the default group."""
        return None


SINGLE_RANK_MESH = Mesh(dp_size=1, sp_size=1)


def build_mesh(cfg: ParallelConfig, *, device_type: str = "cpu") -> Mesh:
    """The mesh of this job, from torch.distributed's rank and world size; `SINGLE_RANK_MESH` when
    torch.distributed is not initialised or the world is one rank. A collective over the whole world:
    every rank calls it, in the same order."""
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else 1
    dp, sp = cfg.degrees(world_size)
    if world_size == 1:
        return SINGLE_RANK_MESH
    device_mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    dp_rank, sp_rank = device_mesh.get_local_rank("dp"), device_mesh.get_local_rank("sp")
    dp_group, sp_group = device_mesh.get_group("dp"), device_mesh.get_group("sp")
    sequence_parallel = None
    if sp > 1:
        sequence_parallel = SequenceParallel(group=sp_group, exchange=cfg.exchange, fallback=cfg.fallback,
                                             check_inputs=cfg.check_inputs)
    return Mesh(dp_size=dp, sp_size=sp, dp_rank=dp_rank, sp_rank=sp_rank, dp_group=dp_group, sp_group=sp_group,
                sequence_parallel=sequence_parallel, device_mesh=device_mesh)
