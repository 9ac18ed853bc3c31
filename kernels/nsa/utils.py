"""Helpers the Triton op files share: constants, interpreter detection, output buffers, delta, and the
tile loads and forward epilogue that their kernels inline."""
from __future__ import annotations

import os

import torch
import torch.utils.deterministic
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read it as is; hosts fold `LOG2E.value` into the scale

# read once, as Triton does when it decorates the kernels
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def p2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def poisoning() -> bool:
    """Outputs start poisoned under the interpreter, and on the GPU under PyTorch's own switch for
    this: deterministic algorithms with `torch.utils.deterministic.fill_uninitialized_memory` (on
    by default), which also fills PyTorch's own `torch.empty`."""
    return INTERPRETING or (torch.are_deterministic_algorithms_enabled()
                            and torch.utils.deterministic.fill_uninitialized_memory)


def output(shape, dtype, device, poison=float("nan")) -> torch.Tensor:
    """An output buffer: uninitialised, or filled with `poison` (NaN, -2 for indices) while
    `poisoning()`, so an element that no program writes shows up in the tests. Filling costs a full
    write of each tensor (1.7 ms of a 378 ms paper-layer fwd+bwd at 128k tokens on an H200)."""
    if poisoning():
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def to_device(x: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A small host-built tensor on the GPU without a host sync: a copy from pageable memory waits
    for the stream, one from pinned memory is queued behind it."""
    x = x.to(dtype) if dtype is not None else x
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@triton.jit
def load_tile(base, rows, row_stride, offs, rows_in, width: tl.constexpr):
    """Rows `rows` x columns `offs` of a row-major tensor, 0 outside `rows_in` and past `width` columns
    (offs spans the power-of-two padded width). Row offsets are taken in int64: at long sequences
    row * row_stride passes 2**31 elements."""
    return tl.load(base + rows[:, None].to(tl.int64) * row_stride + offs[None, :],
                   mask=rows_in[:, None] & (offs[None, :] < width), other=0.0)


@triton.jit
def store_forward_rows(O, LSE, row, valid, acc, m, l, offs_dv, DV: tl.constexpr):
    """Ends an online softmax: o = acc / l and lse (natural log; m is in base 2) of a tile's rows.
    Rows that saw no key get o = 0, lse = -inf."""
    empty = l == 0.0
    o = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / LOG2E)
    tl.store(O + row[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + row, lse, mask=valid)


@triton.jit
def backward_rows(Q, DO, LSE, DELTA, row, valid, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                  BDV: tl.constexpr):
    """q, do, lse in base 2 (+inf where nothing was visible, so p = 0) and delta of a tile's rows."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = load_tile(Q, row, D, offs_d, valid, D)
    do = load_tile(DO, row, DV, offs_dv, valid, DV)
    lse = tl.load(LSE + row, mask=valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return q, do, lse2, tl.load(DELTA + row, mask=valid, other=0.0)


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, n_rows, DV: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr,
                  HAS_DLSE: tl.constexpr):
    """delta = rowsum(o * do) - dlse in fp32, straight from the half-precision tensors."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BDV)
    r_in = r < n_rows
    at = r[:, None].to(tl.int64) * DV + c[None, :]
    m = r_in[:, None] & (c[None, :] < DV)
    d = tl.sum(tl.load(O + at, mask=m, other=0.0).to(tl.float32) * tl.load(DO + at, mask=m, other=0.0).to(tl.float32), 1)
    if HAS_DLSE:  # d lse / d s = p, so a gradient on lse shifts delta
        d -= tl.load(DLSE + r, mask=r_in, other=0.0)
    tl.store(DELTA + r, d, mask=r_in)


def attention_delta(o, do, dlse):
    """`(o * do).sum(-1) - dlse` as fp32 `[B, T, HQ]`, without fp32 copies of o and do."""
    B, T, HQ, DV = o.shape
    out = torch.empty((B, T, HQ), dtype=torch.float32, device=o.device)
    n, BDV = B * T * HQ, p2(max(DV, 16))
    BR = max(1, 4096 // BDV)
    if n:
        _delta_kernel[(triton.cdiv(n, BR),)](o, do, dlse.float().contiguous() if dlse is not None else o, out, n,
                                            DV, BR=BR, BDV=BDV, HAS_DLSE=dlse is not None, num_warps=4)
    return out
