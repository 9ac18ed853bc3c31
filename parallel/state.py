"""Per-step state of the sequence-parallel layer, owned by whoever calls it (never by the group handle).

`ExchangeLog` collects one `ExchangeStats` per NSA layer call for the trainer's byte counts (and,
when timed, the wall time of each collective); `PlanCache` keeps the index tensors that depend only
on shapes (positions, halo and gather orders), so that later calls copy nothing from the host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import torch

UNTIMED = contextlib.nullcontext()  # what a collective runs under when nobody asked for its time


class Stopwatch:
    """Adds the wall time of each `with` block to `seconds[name]`; reusable, so one collective's
    forward and, later, its backward land in the same entry."""

    def __init__(self, seconds: dict, name: str, device: torch.device):
        self.seconds, self.name = seconds, name
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._start = 0.0

    def __enter__(self):
        self._sync()  # host sync: on a GPU the collective's time is its own only once earlier kernels finished
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()  # host sync: and only once its own kernels have
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - self._start
        return False


def stopwatches(names, device: torch.device, *, timed: bool) -> tuple[dict, dict]:
    """`(seconds, {name: context manager})` for one layer call's collectives: stopwatches that fill
    `seconds` when `timed`; otherwise `UNTIMED` for every name, and `seconds` stays empty."""
    seconds: dict = {}
    if not timed:
        return seconds, {name: UNTIMED for name in names}
    return seconds, {name: Stopwatch(seconds, name, device) for name in names}


class ExchangeLog:
    """The `ExchangeStats` that NSA layer calls recorded, in call order, until `pop()` takes them.

    With `timed`, each call also times its collectives (forward and backward) into the stats'
    `seconds`, at the cost of a device synchronisation before and after each one; without it the
    collectives run with no sync and nothing is timed.
    """

    def __init__(self, timed: bool = False):
        self.timed = timed
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
