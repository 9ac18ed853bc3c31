"""The sequence-parallel process group and what is cached per group: passed explicitly, never global."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .collectives import collective_device

EXCHANGES = ("all_to_all", "ring", "all_gather")


@dataclass
class SequenceParallel:
    """`P = size` ranks that share one sequence, rank `r` holding zigzag chunks `r` and `2P-1-r`.

    `exchange` picks how selected remote K/V blocks travel: "all_to_all" (one uneven
    `all_to_all_single`), "ring" (`P-1` point-to-point steps `r -> r+s`) or "all_gather" (every
    rank gathers all K/V: the plain context-parallel baseline). With `fallback`, the first two
    switch to the all-gather for a step whose busiest rank would receive at least as many bytes
    as the all-gather moves. `stats` collects one `ExchangeStats` per NSA layer call, for logging.
    `validate` checks at construction that every rank of the group built it from the same group
    (a collective over the whole world: every rank must construct its `SequenceParallel` together);
    `check_inputs` checks at every layer call that the ranks pass shards of one sequence with one
    config (a tiny all-gather and a host sync; turn it off once the input pipeline is trusted).
    """

    group: Any = None  # a ProcessGroup; None = the default (world) group
    exchange: str = "all_to_all"
    fallback: bool = True
    validate: bool = True
    check_inputs: bool = True
    rank: int = field(init=False)
    size: int = field(init=False)
    stats: list = field(init=False, default_factory=list, repr=False)
    _plans: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs an initialised torch.distributed process group; call "
                               "torch.distributed.init_process_group first")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange={self.exchange!r}: choose one of {EXCHANGES}")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it was "
                             "given; pass the sequence-parallel group that contains it")
        if self.validate:
            self._check_same_group_everywhere()

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

    def pop_stats(self) -> list:
        """The per-layer byte counts recorded since the last call, in layer-call order."""
        out, self.stats = self.stats, []
        return out

    def cached(self, key, build, device=None):
        """A plan for `key`, built once by `build()` (on the CPU) and kept with its tensors on `device`,
        so that later calls copy nothing from the host; a few shapes per run keep the cache small."""
        key = (key, None if device is None else str(device))
        if key not in self._plans:
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = _to_device(build(), device)
        return self._plans[key]


def _to_device(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj

