"""Launch configurations of the Triton kernels: one table per GPU architecture.

`table(device)` gives the table of the device's compute capability (the interpreter has its own,
with tiny tiles so that small tests cross tile and segment edges); `override(...)` replaces entries
for the code run inside it, which is how `bench/kernels.py --tune` times candidates:

    with tuning.override(dense_fwd=tuning.DenseTile(64, 64, 4, 2)):
        window_attention(q, k, v, backend="triton")

Only sm_90 (H100 / H200) is measured; other cards take its table until they are.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import NamedTuple

import torch

from .utils import INTERPRETING


class DenseTile(NamedTuple):
    """A dense-family kernel: (query, head) rows and keys per tile; `rows_major` picks the form of
    the dK/dV loop (see `dense._dense_dkdv_inner`) and is read by that kernel only."""
    rows: int
    keys: int
    warps: int
    stages: int
    rows_major: bool = True


class ScoreTile(NamedTuple):
    """The block-score kernel: (query, head) rows per tile, compressed tokens per chunk."""
    rows: int
    chunk: int
    warps: int
    stages: int


class TopNTile(NamedTuple):
    """The top-n kernel: block scores per program."""
    elems: int
    warps: int


class SelTile(NamedTuple):
    """A selected-attention kernel: (query, head) rows per tile (per step, for dK/dV). For the forward
    and dQ, rows / next_pow2(G) neighbouring queries form a tile (at least one)."""
    rows: int
    warps: int
    stages: int


@dataclasses.dataclass(frozen=True)
class Tuning:
    dense_fwd: DenseTile
    dense_fwd_wide: DenseTile  # the `_wide` entries serve head dims over 128
    dense_dq: DenseTile
    dense_dq_wide: DenseTile
    dense_dkdv: DenseTile
    dense_dkdv_wide: DenseTile
    dense_dkdv_iters: int  # row tiles per dK/dV program before the query range is split across programs
    select: ScoreTile
    select_r1: ScoreTile  # select_size == stride: one compressed token per block
    topn: TopNTile
    topn_segment: int  # blocks one top-n row holds in registers; longer rows go through per-segment candidates
    sel: SelTile
    sel_dkdv: SelTile
    sel_items: int  # (query, head) rows per selected dK/dV work item
    sel_own: float  # a tile whose union holds more than this share of its queries' n blocks each runs query by query
    sel_groups: tuple = ()  # ((G, head dim or 0 for any), SelTile): `sel` for that group size, first match wins

    def sel_for(self, G: int, D: int) -> SelTile:
        """The forward / dQ tile of group size G and head dim D."""
        for (g, d), tile in self.sel_groups:
            if g == G and d in (0, D):
                return tile
        return self.sel


# H200, 64k, paper config. Dense dK/dV fwd+bwd (compressed / window): 32 x 128 keys-major (8 warps)
# 48.9 / 18.2 ms, 64 x 64 rows-major (4 warps) 43.7 / 15.8, 128 x 64 rows-major 48.5 / 16.8.
# Scores: 64 rows, 4 warps 15.0 ms; 128 rows, 8 warps 23.8; 128-token chunks 16.9.
# Top-n: 8-16 scores per thread keep it near 64 registers (32 per thread took 156); select 14.0 ms
# at 1024,4, 14.2 at 2048,4, 14.6 at 4096,4. Selection fwd+bwd: 59.6 ms at 3 stages, 60.6 at 2
# (at least 16 rows: the smallest MMA tile); dK/dV rows 32 61.0 ms, 16 65.0, 64 (8 warps) 77.4.
# Selection at small G, 64k, fwd+bwd on trained-like / random routing (bench/tune_selection.py, one run,
# bench/results/2026-12-03/tune_H200.log): G=4 d64 (llama1b) 16 rows, 2 warps, 3 stages 27.7 / 49.3 ms
# against 30.9 / 54.7 for the default tile, hence its sel_groups entry; G=4 d128 and G=7 d128 keep the
# default (the faster random-routing tiles are slower on trained routing). The query-by-query loop lost
# wherever it ran: sel_own=0 (always) 92.6 / 57.2 / 49.2 ms on trained routing for llama8b / llama1b /
# qwen7b against 45.1 / 30.9 / 34.1, and a union-only table (sel_own >= 0.9) was the fastest on random
# routing (76.8 / 50.5 / 44.9 against 87.8 / 54.7 / 48.4 at 0.75) and equal on trained routing. So
# sel_own=1.0, never (a union holds at most all of its queries' blocks); tiles of one query still go
# query by query. Each change was timed alone; the table as a whole is not yet timed. sel_items 4096
# (the former 256 tiles of 16 rows) is not swept.
SM90 = Tuning(
    dense_fwd=DenseTile(128, 64, 8, 3), dense_fwd_wide=DenseTile(64, 32, 8, 2),
    dense_dq=DenseTile(64, 64, 4, 2), dense_dq_wide=DenseTile(64, 32, 8, 1),
    dense_dkdv=DenseTile(64, 64, 4, 2), dense_dkdv_wide=DenseTile(16, 32, 8, 1, rows_major=False),
    dense_dkdv_iters=256,
    select=ScoreTile(64, 64, 4, 2), select_r1=ScoreTile(64, 32, 4, 2),
    topn=TopNTile(1024, 4), topn_segment=2048,
    sel=SelTile(16, 4, 3), sel_dkdv=SelTile(32, 4, 2), sel_items=4096, sel_own=1.0,
    sel_groups=(((4, 64), SelTile(16, 2, 3)),),
)

_TINY = DenseTile(16, 16, 4, 1)
INTERPRETER = Tuning(
    dense_fwd=_TINY, dense_fwd_wide=_TINY, dense_dq=_TINY, dense_dq_wide=_TINY,
    dense_dkdv=_TINY, dense_dkdv_wide=_TINY._replace(rows_major=False), dense_dkdv_iters=8,
    select=ScoreTile(16, 16, 4, 1), select_r1=ScoreTile(16, 16, 4, 1),
    topn=TopNTile(1024, 4), topn_segment=8,
    sel=SelTile(16, 4, 1), sel_dkdv=SelTile(32, 4, 1), sel_items=48, sel_own=0.25,
)

TABLES = {(9, 0): SM90}
GENERIC = SM90

_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("nsa_tuning_overrides", default={})


@functools.lru_cache(maxsize=None)
def _capability_table(index: int) -> Tuning:
    return TABLES.get(torch.cuda.get_device_capability(index), GENERIC)


def table(device) -> Tuning:
    """The launch configurations for kernels on `device`, with any `override` in force applied."""
    device = torch.device(device)
    if INTERPRETING:
        base = INTERPRETER
    elif device.type == "cuda":
        base = _capability_table(device.index if device.index is not None else torch.cuda.current_device())
    else:
        base = GENERIC
    changes = _overrides.get()
    return dataclasses.replace(base, **changes) if changes else base


@contextlib.contextmanager
def override(**entries):
    """Replace table entries (by field name of `Tuning`) for the code run inside, on every device."""
    unknown = set(entries) - {f.name for f in dataclasses.fields(Tuning)}
    if unknown:
        raise ValueError(f"unknown tuning entries {sorted(unknown)}: choose from the fields of tuning.Tuning")
    token = _overrides.set({**_overrides.get(), **entries})
    try:
        yield
    finally:
        _overrides.reset(token)
