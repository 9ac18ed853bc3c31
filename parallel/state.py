"""Per-step state of the sequence-parallel layer, owned by whoever calls it (never by the group handle).

`ExchangeLog` collects one `ExchangeStats` per NSA layer call for the trainer's byte counts;
`PlanCache` keeps the index tensors that depend only on shapes (positions, halo and gather orders),
so that later calls copy nothing from the host.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


class ExchangeLog:
    """The `ExchangeStats` that NSA layer calls recorded, in call order, until `pop()` takes them."""

    def __init__(self):
        self._stats: list = []

    def record(self, stats) -> None:
        self._stats.append(stats)

    def pop(self) -> list:
        """What was recorded since the last `pop()`, oldest first; the log is empty afterwards."""
        out, self._stats = self._stats, []
        return out

    def __len__(self) -> int:
        return len(self._stats)


class PlanCache:
    """Plans built once per key (on the CPU) and kept with their tensors on the device they are used on.

    A run sees a few shapes, so the cache stays small; past `capacity` entries the oldest is dropped.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._plans: dict = {}

    def get(self, key, build: Callable[[], Any], device=None):
        key = (key, None if device is None else str(device))
        if key not in self._plans:
            if len(self._plans) >= self.capacity:
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
