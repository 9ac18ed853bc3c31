"""Triton backend of the NSA ops: same keyword signatures and semantics as `reference.py`.

Four algorithms, each one kernel family with compile-time flags (README.md, "Triton kernels"):

- `_dense_*`: FlashAttention-style tiles over a per-query interval of visible keys `[lo_t, hi_t)`
  computed on the host from positions; serves the compressed branch and the sliding window.
  Rows of a tile are (query, head) pairs of one KV group, so the group shares each K/V load.
- `_block_score_kernel` + `_top_n_kernel`: block importance (Eq. 8-10) over chunks of compressed
  tokens into a bounded buffer of per-block scores, then an exact sort-free top-n by a binary
  search over the scores' bits; no `[T, T/d]` score matrix reaches HBM.
- `_sel_*`: selected-block attention over the union of the block lists of a few neighbouring
  queries (all G heads of each), so small groups still fill a 16-row MMA tile.
- `_sel_dkdv_kernel` + `_sel_reduce_kernel`: backward of K/V per selected block from a
  block -> query-tile index (CSR), split into bounded work items and summed in a fixed order.

No atomics anywhere: every output element is written by exactly one program, so results are
deterministic. Inputs are made contiguous `[B, T, heads, dim]`; lse is fp32. Without cu_seqlens
nothing makes the host wait for the GPU (small host-built tables go through pinned memory, grids
are sized from host-known bounds), so launches queue ahead of the kernels.
"""
from __future__ import annotations

import bisect
import os

import torch
import triton
import triton.language as tl

from .layout import compressed_layout, num_compressed, token_layout

_LOG2E = 1.4426950408889634
_POS_KEY = 1 << 40  # separates documents in the (document, position) sort keys
_NO_UNIT = 2**31 - 1  # "no selected block" in the unit lists; sorts last
_DKDV_ITERS = 256  # row tiles per dK/dV program before the query range is split across programs
_DKDV_MAX_SPLITS = 64  # bounds the fp32 partial buffers of the split


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _output(shape, dtype, device, poison=float("nan")) -> torch.Tensor:
    """An output buffer: uninitialised, or filled with `poison` (NaN, -2 for indices) under the
    interpreter and with NSA_TRITON_POISON=1 (the GPU tests), so an element that no program writes
    shows up there. Filling costs a full write of each tensor (1.7 ms of a 378 ms paper-layer fwd+bwd
    at 128k tokens on an H200)."""
    if _interpreting() or os.environ.get("NSA_TRITON_POISON", "0") == "1":
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _to_device(x: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A small host-built tensor on the GPU without a host sync: a copy from pageable memory waits
    for the stream, one from pinned memory is queued behind it."""
    x = x.to(dtype) if dtype is not None else x
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@triton.jit
def _row_layout(pid_t, pid_hg, T, G, NGC, BT: tl.constexpr, GP: tl.constexpr):
    """Rows of a tile: BT queries x GP heads of one KV group (head chunk pid_hg % NGC)."""
    h = pid_hg // NGC
    gc = pid_hg % NGC
    r = tl.arange(0, BT * GP)
    t = pid_t * BT + r // GP
    g = gc * GP + r % GP
    valid = (t < T) & (g < G)
    return h, t, g, valid


@triton.jit
def _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, k_row, v_row, lo, hi, start, end, Tk, D: tl.constexpr, DV: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr):
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for j0 in range(start, end, BN):
        kj = j0 + offs_n
        kin = kj < Tk
        k = tl.load(k_base + kj[:, None].to(tl.int64) * k_row + offs_d[None, :],
                    mask=kin[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where((kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kj[:, None].to(tl.int64) * v_row + offs_dv[None, :],
                    mask=kin[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    return acc, m, l


@triton.jit
def _tile_ranges(lo, hi, valid, Tk, BN: tl.constexpr):
    """Key-tile ranges of a row tile: [a, b1) masked, [b1, b2) every row sees every key, [b2, e) masked."""
    min_lo = tl.min(tl.where(valid, lo, Tk), 0)
    max_lo = tl.max(tl.where(valid, lo, 0), 0)
    min_hi = tl.min(tl.where(valid, hi, Tk), 0)
    max_hi = tl.max(tl.where(valid, hi, 0), 0)
    a = (min_lo // BN) * BN
    e = max_hi
    b1 = tl.minimum(tl.cdiv(max_lo, BN) * BN, e)
    b1 = tl.maximum(b1, a)
    b2 = tl.maximum(b1, tl.minimum((min_hi // BN) * BN, e))
    return a, b1, b2, e


@triton.jit
def _dense_fwd_kernel(Q, K, V, O, LSE, LO, HI, qk_scale, T, Tk, HQ, H, G, NGC, D: tl.constexpr, DV: tl.constexpr,
                      BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      BDV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_hg = tl.program_id(1)
    bb = tl.program_id(2)
    h, t, g, valid = _row_layout(pid_t, pid_hg, T, G, NGC, BT, GP)
    hq = h * G + g
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row = (bb * T + t).to(tl.int64) * HQ + hq
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    lo = tl.load(LO + t, mask=valid, other=0)
    hi = tl.load(HI + t, mask=valid, other=0)
    a, b1, b2, e = _tile_ranges(lo, hi, valid, Tk, BN)
    k_base = K + (bb.to(tl.int64) * Tk * H + h) * D
    v_base = V + (bb.to(tl.int64) * Tk * H + h) * DV
    m = tl.full([BT * GP], float("-inf"), tl.float32)
    l = tl.zeros([BT * GP], tl.float32)
    acc = tl.zeros([BT * GP, BDV], tl.float32)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, lo, hi, a, b1, Tk, D, DV, BN, BD, BDV, True)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, lo, hi, b1, b2, Tk, D, DV, BN, BD, BDV, False)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, lo, hi, b2, e, Tk, D, DV, BN, BD, BDV, True)
    empty = l == 0.0
    o = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / 1.4426950408889634)
    tl.store(O + row[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + row, lse, mask=valid)


@triton.jit
def _backward_rows(Q, DO, LSE, DELTA, row, valid, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                   BDV: tl.constexpr):
    """q, do, lse in base 2 (+inf where nothing was visible, so p = 0) and delta of a tile's rows."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + row[:, None] * DV + offs_dv[None, :], mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + row, mask=valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return q, do, lse2, tl.load(DELTA + row, mask=valid, other=0.0)


@triton.jit
def _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, k_row, v_row, lo, hi, start, end, Tk, D: tl.constexpr, DV: tl.constexpr,
                    BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr):
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for j0 in range(start, end, BN):
        kj = j0 + offs_n
        kin = kj < Tk
        k = tl.load(k_base + kj[:, None].to(tl.int64) * k_row + offs_d[None, :],
                    mask=kin[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + kj[:, None].to(tl.int64) * v_row + offs_dv[None, :],
                    mask=kin[:, None] & (offs_dv[None, :] < DV), other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where((kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dense_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LO, HI, qk_scale, scale, T, Tk, HQ, H, G, NGC, D: tl.constexpr, DV: tl.constexpr,
                     BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     BDV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_hg = tl.program_id(1)
    bb = tl.program_id(2)
    h, t, g, valid = _row_layout(pid_t, pid_hg, T, G, NGC, BT, GP)
    hq = h * G + g
    offs_d = tl.arange(0, BD)
    row = (bb * T + t).to(tl.int64) * HQ + hq
    q, do, lse2, delta = _backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
    lo = tl.load(LO + t, mask=valid, other=0)
    hi = tl.load(HI + t, mask=valid, other=0)
    a, b1, b2, e = _tile_ranges(lo, hi, valid, Tk, BN)
    k_base = K + (bb.to(tl.int64) * Tk * H + h) * D
    v_base = V + (bb.to(tl.int64) * Tk * H + h) * DV
    dq = tl.zeros([BT * GP, BD], tl.float32)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, lo, hi, a, b1, Tk, D, DV, BN, BD, BDV, True)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, lo, hi, b1, b2, Tk, D, DV, BN, BD, BDV,
                         False)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, lo, hi, b2, e, Tk, D, DV, BN, BD, BDV, True)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dense_dkdv_inner(dk, dv, k, v, kj, Q, DO, LSE, DELTA, LO, HI, qk_scale, bb, h, g, start, end, T, Tk, HQ, G,
                      D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr,
                      BDV: tl.constexpr, MASKED: tl.constexpr, ROWS_MAJOR: tl.constexpr):
    """dK, dV of one key tile from the query tiles [start, end); MASKED=False where every row sees every key.

    ROWS_MAJOR computes p as [rows, keys] (the row tile is the MMA's M side and k, v stay operands
    read from shared memory); otherwise as [keys, rows] (the key tile is M, k and v sit in registers)."""
    r = tl.arange(0, BT * GP)
    hq = h * G + g
    for t0 in range(start, end, BT):
        t = t0 + r // GP
        valid = (t < T) & (g < G)
        q, do, lse2, delta = _backward_rows(Q, DO, LSE, DELTA, (bb * T + t).to(tl.int64) * HQ + hq, valid, D, DV, BD,
                                            BDV)
        if ROWS_MAJOR:
            p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
            if MASKED:
                lo = tl.load(LO + t, mask=valid, other=Tk)
                hi = tl.load(HI + t, mask=valid, other=0)
                p = tl.where((kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None]), p, 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
            dp = tl.dot(do, tl.trans(v))
            dk = tl.dot(tl.trans((p * (dp - delta[:, None])).to(q.dtype)), q, dk)  # padded rows: q = do = 0
        else:
            pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
            if MASKED:
                lo = tl.load(LO + t, mask=valid, other=Tk)
                hi = tl.load(HI + t, mask=valid, other=0)
                pT = tl.where((kj[:, None] >= lo[None, :]) & (kj[:, None] < hi[None, :]), pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
            dk = tl.dot((pT * (dpT - delta[None, :])).to(q.dtype), q, dk)  # padded rows: q = do = 0, no effect
    return dk, dv


@triton.jit
def _dense_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, LO, HI, QLO, QHI, qk_scale, scale, T, Tk, HQ, H, G,
                       NGC: tl.constexpr, QS, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
                       BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PARTIAL: tl.constexpr,
                       ROWS_MAJOR: tl.constexpr):
    """One program per (key tile, KV head, split of QS queries): sums over the G heads and the
    split's queries that see the tile. PARTIAL: write fp32 partials [split, B, Tk, H, D] that the
    host sums in split order (the early compressed keys are seen by nearly every query, so one
    program per key tile would serialise the whole sequence).

    The queries that see every key of the tile form one range, `[QLO[last key], QHI[first key])`
    (lo and hi grow with the query); its whole row tiles skip the mask arithmetic."""
    pid_k = tl.program_id(0)
    h = tl.program_id(1) % H
    split = tl.program_id(1) // H
    bb = tl.program_id(2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    kj = pid_k * BN + tl.arange(0, BN)
    kin = kj < Tk
    krow = (bb * Tk + kj).to(tl.int64) * H + h
    k = tl.load(K + krow[:, None] * D + offs_d[None, :], mask=kin[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=kin[:, None] & (offs_dv[None, :] < DV), other=0.0)
    t_lo = tl.min(tl.load(QLO + kj, mask=kin, other=T), 0)
    t_hi = tl.max(tl.load(QHI + kj, mask=kin, other=0), 0)
    t_lo = tl.maximum((t_lo // BT) * BT, split * QS)
    t_hi = tl.minimum(t_hi, split * QS + QS)
    all_from = tl.load(QLO + tl.minimum(pid_k * BN + BN, Tk) - 1)  # first query that sees the tile's last key
    all_to = tl.load(QHI + pid_k * BN)  # one past the last query that sees its first key
    m1 = tl.minimum(t_lo + tl.cdiv(tl.maximum(all_from - t_lo, 0), BT) * BT, t_hi)
    m2 = tl.maximum(tl.minimum(t_lo + tl.maximum(all_to - t_lo, 0) // BT * BT, t_hi), m1)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    r = tl.arange(0, BT * GP)
    for gc in tl.static_range(0, NGC):  # head chunks (G > 16 only): unrolled, so one loop nest per chunk
        g = gc * GP + r % GP
        dk, dv = _dense_dkdv_inner(dk, dv, k, v, kj, Q, DO, LSE, DELTA, LO, HI, qk_scale, bb, h, g, t_lo, m1, T, Tk,
                                   HQ, G, D, DV, BT, GP, BD, BDV, True, ROWS_MAJOR)
        dk, dv = _dense_dkdv_inner(dk, dv, k, v, kj, Q, DO, LSE, DELTA, LO, HI, qk_scale, bb, h, g, m1, m2, T, Tk,
                                   HQ, G, D, DV, BT, GP, BD, BDV, False, ROWS_MAJOR)
        dk, dv = _dense_dkdv_inner(dk, dv, k, v, kj, Q, DO, LSE, DELTA, LO, HI, qk_scale, bb, h, g, m2, t_hi, T, Tk,
                                   HQ, G, D, DV, BT, GP, BD, BDV, True, ROWS_MAJOR)
    if PARTIAL:
        prow = ((split * tl.num_programs(2) + bb) * Tk + kj).to(tl.int64) * H + h
        tl.store(DK + prow[:, None] * BD + offs_d[None, :], dk * scale, mask=kin[:, None])
        tl.store(DV_OUT + prow[:, None] * BDV + offs_dv[None, :], dv, mask=kin[:, None])
    else:
        tl.store(DK + krow[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=kin[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + krow[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=kin[:, None] & (offs_dv[None, :] < DV))


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


def _delta(o, do, dlse):
    """`(o * do).sum(-1) - dlse` as fp32 `[B, T, HQ]`, without fp32 copies of o and do."""
    B, T, HQ, DV = o.shape
    delta = torch.empty((B, T, HQ), dtype=torch.float32, device=o.device)
    n, BDV = B * T * HQ, _p2(max(DV, 16))
    BR = max(1, 4096 // BDV)
    if n:
        _delta_kernel[(triton.cdiv(n, BR),)](o, do, dlse.float().contiguous() if dlse is not None else o, delta, n,
                                            DV, BR=BR, BDV=BDV, HAS_DLSE=dlse is not None, num_warps=4)
    return delta


def _dense_config(kind: str, G: int, D: int, DV: int):
    """(rows per tile, keys per tile, num_warps, num_stages) for one kernel of the dense family."""
    GP = min(_p2(G), 16)
    if _interpreting():
        rows, bn, warps, stages = 16, 16, 4, 1
    elif kind == "fwd":
        rows, bn, warps, stages = (128, 64, 8, 3) if max(D, DV) <= 128 else (64, 32, 8, 2)
    elif kind == "dq":
        rows, bn, warps, stages = (64, 64, 4, 2) if max(D, DV) <= 128 else (64, 32, 8, 1)
    else:  # H200, 64k, paper config, fwd+bwd of the compressed / window branch: 32 x 128 keys-major (8 warps)
        # 48.9 / 18.2 ms, 64 x 64 rows-major (4 warps) 43.7 / 15.8, 128 x 64 rows-major 48.5 / 16.8
        rows, bn, warps, stages = (64, 64, 4, 2) if max(D, DV) <= 128 else (16, 32, 8, 1)
    tuned = os.environ.get(f"NSA_TRITON_DENSE_{kind.upper()}")  # "rows,keys,warps,stages": for tuning runs
    if tuned and not _interpreting():
        rows, bn, warps, stages = (int(x) for x in tuned.split(",")[:4])
    rows = max(rows, GP)
    return GP, rows // GP, bn, warps, stages


def _dkdv_rows_major(D: int, DV: int) -> bool:
    """The form of the dK/dV loop (see `_dense_dkdv_inner`): rows-major up to head dim 128; a fifth
    field "rows" or "keys" of NSA_TRITON_DENSE_DKDV picks it for tuning runs."""
    tuned = os.environ.get("NSA_TRITON_DENSE_DKDV", "").split(",")
    if len(tuned) > 4 and not _interpreting():
        return tuned[4] == "rows"
    return max(D, DV) <= 128


def _dense_forward(q, k, v, lo, hi, scale):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP, BT, BN, warps, stages = _dense_config("fwd", G, D, DV)
    NGC = triton.cdiv(G, GP)
    o = _output((B, T, HQ, DV), q.dtype, q.device)
    lse = _output((B, T, HQ), torch.float32, q.device)
    if T == 0:
        return o, lse
    grid = (triton.cdiv(T, BT), H * NGC, B)
    _dense_fwd_kernel[grid](q, k, v, o, lse, lo, hi, scale * _LOG2E, T, Tk, HQ, H, G, NGC, D, DV,
                            BT=BT, GP=GP, BN=BN, BD=_p2(max(D, 16)), BDV=_p2(max(DV, 16)),
                            num_warps=warps, num_stages=stages)
    return o, lse


def _dense_backward(q, k, v, o, lse, do, dlse, lo, hi, scale, span):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    do = do.contiguous()
    delta = _delta(o, do, dlse)  # (B, T, HQ)
    dq = _output(q.shape, q.dtype, q.device)
    dk = _output(k.shape, k.dtype, k.device)
    dv = _output(v.shape, v.dtype, v.device)
    BD, BDV = _p2(max(D, 16)), _p2(max(DV, 16))
    keys = torch.arange(Tk, device=q.device, dtype=lo.dtype)
    qlo = torch.searchsorted(hi, keys, right=True).to(torch.int32)  # first query whose interval ends after key j
    qhi = torch.searchsorted(lo, keys, right=True).to(torch.int32)  # one past the last query whose interval starts <= j
    if T:
        GP, BT, BN, warps, stages = _dense_config("dq", G, D, DV)
        NGC = triton.cdiv(G, GP)
        _dense_dq_kernel[(triton.cdiv(T, BT), H * NGC, B)](
            q, k, v, do, lse, delta, dq, lo, hi, scale * _LOG2E, scale, T, Tk, HQ, H, G, NGC, D, DV,
            BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, num_warps=warps, num_stages=stages)
    if Tk:
        GP, BT, BN, warps, stages = _dense_config("dkdv", G, D, DV)
        NGC = triton.cdiv(G, GP)
        # `span` bounds the queries one key tile meets: split the query axis only when that is long
        QS = BT * max(1, (8 if _interpreting() else _DKDV_ITERS) // NGC)
        n_split = 1 if min(span, T) <= 4 * QS else min(triton.cdiv(T, QS), _DKDV_MAX_SPLITS)
        QS = triton.cdiv(triton.cdiv(T + BT, n_split), BT) * BT
        partial = n_split > 1
        if partial:
            pdk = torch.empty((n_split, B, Tk, H, BD), dtype=torch.float32, device=q.device)
            pdv = torch.empty((n_split, B, Tk, H, BDV), dtype=torch.float32, device=q.device)
        _dense_dkdv_kernel[(triton.cdiv(Tk, BN), H * n_split, B)](
            q, k, v, do, lse, delta, pdk if partial else dk, pdv if partial else dv, lo, hi, qlo, qhi,
            scale * _LOG2E, scale, T, Tk, HQ, H, G, NGC, QS, D, DV,
            BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, PARTIAL=partial, ROWS_MAJOR=_dkdv_rows_major(D, DV),
            num_warps=warps, num_stages=stages)
        if partial:  # a fixed-order sum over the splits: deterministic
            dk.copy_(pdk.sum(0)[..., :D])
            dv.copy_(pdv.sum(0)[..., :DV])
    return dq, dk, dv


class _DenseAttention(torch.autograd.Function):
    """Attention of each query over its key interval `[lo_t, hi_t)`; returns (o, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, scale, span):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _dense_forward(q, k, v, lo, hi, scale)
        ctx.save_for_backward(q, k, v, o, lse, lo, hi)
        ctx.scale, ctx.span = scale, span
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, lo, hi = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _dense_backward(q, k, v, o, lse, do, dlse, lo, hi, ctx.scale, ctx.span)
        return dq, dk, dv, None, None, None, None


def _compressed_intervals(T, q_offset, Tc, block_len, stride, cu_seqlens, device):
    """Visible compressed tokens of each query: `[lo_t, hi_t)` in k_cmp (its document's, whole block past)."""
    qlay = token_layout(q_offset, T, cu_seqlens, device)
    cdoc, cidx = compressed_layout(Tc, block_len, stride, cu_seqlens, device)
    key = cdoc * _POS_KEY + cidx * stride + block_len - 1  # ascending: documents in order, ends within each
    lo = torch.searchsorted(cdoc, qlay.doc, right=False)
    hi = torch.searchsorted(key, qlay.doc * _POS_KEY + qlay.pos, right=True)
    return lo.to(torch.int32), hi.to(torch.int32)


def _window_intervals(T, q_offset, Tk, k_offset, window, cu_seqlens, device):
    """Keys `(t - window, t]` of the query's document, as local indices into k."""
    qlay = token_layout(q_offset, T, cu_seqlens, device)
    klay = token_layout(k_offset, Tk, cu_seqlens, device)
    key = klay.doc * _POS_KEY + klay.pos
    lo = torch.searchsorted(key, qlay.doc * _POS_KEY + qlay.pos - window + 1, right=False)
    hi = torch.searchsorted(key, qlay.doc * _POS_KEY + qlay.pos, right=True)
    return lo.to(torch.int32), hi.to(torch.int32)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale, q_offset=0, cu_seqlens=None):
    """Attention over the compressed tokens whose whole block is in the query's past.

    q `[B, T, HQ, D]`, k_cmp `[B, Tc, H, D]`, v_cmp `[B, Tc, H, Dv]` (bf16/fp16, or fp32) ->
    o `[B, T, HQ, Dv]` (q's dtype), lse `[B, T, HQ]` fp32; no visible token: o = 0, lse = -inf.
    """
    lo, hi = _compressed_intervals(q.shape[1], q_offset, k_cmp.shape[1], block_len, stride, cu_seqlens, q.device)
    return _DenseAttention.apply(q, k_cmp, v_cmp, lo, hi, scale, q.shape[1])


def window_attention(q, k, v, *, window, scale, q_offset=0, k_offset=0, cu_seqlens=None):
    """Sliding window: query at global position t sees keys `(t - window, t]` of its document.

    q `[B, T, HQ, D]`, k `[B, Tk, H, D]`, v `[B, Tk, H, Dv]`; k/v start at global token k_offset
    and must cover every query's window (else ValueError, as the reference).
    """
    T, Tk = q.shape[1], k.shape[1]
    if T:
        first_doc_start = 0
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist()  # host sync, as the api's own validation of cu_seqlens
            first_doc_start = cu[max(0, bisect.bisect_right(cu, q_offset) - 1)]
        need = max(first_doc_start, q_offset - window + 1)
        if need < k_offset or q_offset + T > k_offset + Tk:
            raise ValueError(f"window_attention: queries [{q_offset}, {q_offset + T}) need keys from global token "
                             f"{need} on, but k covers [{k_offset}, {k_offset + Tk}); pass the preceding "
                             f"window-1 keys (the halo) and set k_offset")
    lo, hi = _window_intervals(T, q_offset, Tk, k_offset, window, cu_seqlens, q.device)
    return _DenseAttention.apply(q, k, v, lo, hi, scale, window + 64)[0]


@triton.jit
def _score_chunks(q, lse2, pos_r, w, q_in, KC, SCORES, out, kc_base, qk_scale, c_start, c_end, ncmp, H, NBW,
                  D: tl.constexpr, block_len: tl.constexpr, stride: tl.constexpr, R: tl.constexpr,
                  EXTRA: tl.constexpr, STEP: tl.constexpr, BT: tl.constexpr, GPAD: tl.constexpr, BC: tl.constexpr,
                  BNB: tl.constexpr, BD: tl.constexpr, MASKED: tl.constexpr):
    """Block scores of the chunks [c_start, c_end); MASKED=False where every row sees every token."""
    offs_d = tl.arange(0, BD)
    jj = tl.arange(0, BNB)
    ci = tl.arange(0, BC)
    for c in range(c_start, c_end):
        j0 = c * STEP
        i = j0 * R - EXTRA + ci
        kc_at = KC + (kc_base + i.to(tl.int64) * H)[:, None] * D + offs_d[None, :]
        if MASKED:
            t_in = (i >= 0) & (i < ncmp)
            kc = tl.load(kc_at, mask=t_in[:, None] & (offs_d[None, :] < D), other=0.0)
            vis = t_in[None, :] & (i[None, :] * stride + block_len - 1 <= pos_r[:, None])
            p = tl.where(vis, tl.exp2(tl.dot(q, tl.trans(kc)) * qk_scale - lse2[:, None]), 0.0)
        else:
            kc = tl.load(kc_at, mask=offs_d[None, :] < D, other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(kc)) * qk_scale - lse2[:, None])
        p = tl.sum(tl.reshape(p, [BT, GPAD, BC]), 1)  # Eq. 10 before Eq. 9: both are linear
        if BT >= 16:
            bs = tl.dot(p, w, input_precision="tf32x3")  # fp32-accurate: near-ties decide the selection
        else:  # too few rows for an MMA: [BT, BC, BNB] products in fp32 registers
            bs = tl.sum(p[:, :, None] * w[None, :, :], 1)
        bs = tl.where(bs > 0.0, bs, 0.0)  # +0.0, never -0.0: the top-n compares bit patterns
        j = j0 + jj
        tl.store(SCORES + out[:, None] + j[None, :], bs, mask=q_in[:, None] & (jj[None, :] < STEP) & (j[None, :] < NBW))


@triton.jit
def _block_score_kernel(Q, KC, LSE, SCORES, TILES, qk_scale, T, Tc, HQ, H, G, q_offset, tile0, row0, QC, NBW,
                        D: tl.constexpr, block_len: tl.constexpr, stride: tl.constexpr, select_size: tl.constexpr,
                        R: tl.constexpr, EXTRA: tl.constexpr, STEP: tl.constexpr, BT: tl.constexpr,
                        GPAD: tl.constexpr, BC: tl.constexpr, BNB: tl.constexpr, BD: tl.constexpr):
    """Eq. 8-10 for BT queries of one document and one KV head: the group-summed importance of
    every selection block up to the tile's last query, written to SCORES[b, query - row0, h, block]
    (row width NBW). Forcing the initial and local blocks is `_top_n_kernel`'s job.

    Compressed tokens come in chunks of BC starting EXTRA tokens before the chunk's first block,
    so every token that overlaps one of the chunk's STEP blocks is in the chunk; the Eq. 9 weights
    are a [BC, BNB] matrix from the overlap formula, the same for every chunk, applied after the
    group sum. Chunks whose tokens every row of the tile sees skip the mask; rows outside the tile
    or the group get lse = +inf, so their p is 0 without one. No data-dependent branch.
    """
    pid = tile0 + tl.program_id(0)
    h = tl.program_id(1)
    bb = tl.program_id(2)
    t_start = tl.load(TILES + pid * 5)
    t_end = tl.load(TILES + pid * 5 + 1)
    doc_start = tl.load(TILES + pid * 5 + 2)
    cstart = tl.load(TILES + pid * 5 + 3)
    ncmp = tl.load(TILES + pid * 5 + 4)
    r = tl.arange(0, BT * GPAD)
    t = t_start + r // GPAD
    g = r % GPAD
    valid = (t < t_end) & (g < G)
    row = (bb * T + t).to(tl.int64) * HQ + h * G + g
    offs_d = tl.arange(0, BD)
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    lse = tl.load(LSE + row, mask=valid, other=0.0)
    lse2 = tl.where(tl.abs(lse) < float("inf"), lse * 1.4426950408889634, 0.0)  # the reference's rule for -inf
    lse2 = tl.where(valid, lse2, float("inf"))
    pos_r = q_offset + t - doc_start
    tq = t_start + tl.arange(0, BT)
    q_in = tq < t_end
    out = ((bb * QC + tq - row0) * H + h).to(tl.int64) * NBW
    kc_base = (bb * Tc + cstart).to(tl.int64) * H + h  # the row of the document's first compressed token
    ci = tl.arange(0, BC)
    jj = tl.arange(0, BNB)
    ov = tl.minimum((ci[:, None] - EXTRA) * stride + block_len, (jj[None, :] + 1) * select_size) - \
        tl.maximum((ci[:, None] - EXTRA) * stride, jj[None, :] * select_size)
    w = tl.where((ov > 0) & (jj[None, :] < STEP), ov.to(tl.float32) / stride, 0.0)
    # chunk c holds tokens [c*STEP*R - EXTRA, ... + BC); every row sees tokens [0, i_all] (the first
    # query does): chunks [c_lo, c_hi) need no mask
    n_chunks = tl.cdiv((q_offset + t_end - 1 - doc_start) // select_size + 1, STEP)
    first = q_offset + t_start - doc_start - block_len + 1  # >= 0 once the first query sees a token
    i_all = tl.where(first >= 0, tl.minimum(ncmp - 1, first // stride), -1)
    c_lo = tl.minimum((EXTRA + STEP * R - 1) // (STEP * R), n_chunks)
    num = i_all + EXTRA - BC + 1 + STEP * R
    c_hi = tl.maximum(tl.minimum(tl.where(num > 0, num // (STEP * R), 0), n_chunks), c_lo)
    _score_chunks(q, lse2, pos_r, w, q_in, KC, SCORES, out, kc_base, qk_scale, 0, c_lo, ncmp, H, NBW, D,
                  block_len, stride, R, EXTRA, STEP, BT, GPAD, BC, BNB, BD, True)
    _score_chunks(q, lse2, pos_r, w, q_in, KC, SCORES, out, kc_base, qk_scale, c_lo, c_hi, ncmp, H, NBW, D,
                  block_len, stride, R, EXTRA, STEP, BT, GPAD, BC, BNB, BD, False)
    _score_chunks(q, lse2, pos_r, w, q_in, KC, SCORES, out, kc_base, qk_scale, c_hi, n_chunks, ncmp, H, NBW, D,
                  block_len, stride, R, EXTRA, STEP, BT, GPAD, BC, BNB, BD, True)


@triton.jit
def _top_n_kernel(SC, IDS_IN, NBQ, IDS_OUT, SC_OUT, n_rows, NQ, H, QC, nseg, width, out_T, row0,
                  top_n: tl.constexpr, num_init: tl.constexpr, num_local: tl.constexpr, W: tl.constexpr,
                  RB: tl.constexpr, NP: tl.constexpr, CANDIDATES_IN: tl.constexpr, CANDIDATES_OUT: tl.constexpr):
    """The top_n entries of each of RB rows of block scores (higher score first, equal scores to the
    lower block id), written in ascending block order with -1 in the empty slots.

    Exact and sort-free: block scores are non-negative floats (+inf for forced blocks), whose bit
    patterns order like their values, so a 31-step binary search over the bits finds each row's
    n-th largest score; the blocks above it are taken, and of those equal to it the first ones in
    block order. Rows either hold one segment of W scores of a query's blocks (ids implicit, the
    row's causal blocks counted by NBQ) or, with CANDIDATES_IN, the (score, id) candidates that
    per-segment calls wrote (CANDIDATES_OUT) for a row longer than one segment; invalid entries
    carry score -1. Rows are (batch, query of the chunk, head[, segment]); the chunk's first NQ
    of its QC query slots are real. Reading a segment, the forced blocks (the first num_init, and
    the query's own block with the num_local - 1 before it) get score +inf.
    """
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    qi = (r // (H * nseg)) % QC
    r_in = (r < n_rows) & (qi < NQ)
    cols = tl.arange(0, W)
    if CANDIDATES_IN:
        cin = r_in[:, None] & (cols[None, :] < width)
        at = r[:, None].to(tl.int64) * width + cols[None, :]
        x = tl.load(SC + at, mask=cin, other=-1.0)
    else:
        seg = r % nseg
        nb = tl.load(NBQ + qi, mask=r_in, other=0)
        ncol = tl.minimum(tl.maximum(nb - seg * W, 0), W)
        x = tl.load(SC + r[:, None].to(tl.int64) * W + cols[None, :], mask=cols[None, :] < ncol[:, None], other=-1.0)
        back = (nb - 1 - seg * W)[:, None] - cols[None, :]  # blocks before the query's own
        forced = ((seg * W)[:, None] + cols[None, :] < num_init) | ((back >= 0) & (back < num_local))
        x = tl.where(forced & (cols[None, :] < ncol[:, None]), float("inf"), x)
    bits = x.to(tl.int32, bitcast=True)  # the only [RB, W] tensor live in the search: ids come after
    n_valid = tl.sum((bits >= 0).to(tl.int32), 1)
    lo = tl.zeros([RB], tl.int32)  # count(bits >= lo) >= top_n whenever the row has top_n valid entries
    hi = tl.full([RB], 0x7F800001, tl.int32)  # count(bits >= hi) == 0: above +inf
    for _ in range(31):  # hi - lo < 2^31 halves to 1
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid[:, None]).to(tl.int32), 1) >= top_n
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = bits > lo[:, None]
    tied = bits == lo[:, None]
    need = top_n - tl.sum(above.to(tl.int32), 1)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= need[:, None]))
    take = tl.where(n_valid[:, None] <= top_n, bits >= 0, take) & r_in[:, None]
    n_take = tl.sum(take.to(tl.int32), 1)
    if CANDIDATES_OUT:
        out = r.to(tl.int64) * top_n
    else:  # rows are (batch, query of the chunk, head); idx is [B, out_T, H, top_n]
        out = (((r // (H * QC)) * out_T + row0 + qi) * H + r % H).to(tl.int64) * top_n
    if CANDIDATES_IN:
        ids = tl.load(IDS_IN + at, mask=take, other=-1)
    else:
        ids = (seg * W)[:, None] + cols[None, :]
    slot = tl.cumsum(take.to(tl.int32), 1) - 1
    tl.store(IDS_OUT + out[:, None] + slot, ids, mask=take)
    s = tl.arange(0, NP)
    empty = (s[None, :] >= n_take[:, None]) & (s[None, :] < top_n) & r_in[:, None]
    tl.store(IDS_OUT + out[:, None] + s[None, :], tl.full([RB, NP], -1, tl.int32), mask=empty)
    if CANDIDATES_OUT:
        tl.store(SC_OUT + out[:, None] + slot, bits.to(tl.float32, bitcast=True), mask=take)
        tl.store(SC_OUT + out[:, None] + s[None, :], tl.full([RB, NP], -1.0, tl.float32), mask=empty)


def _select_tiles(T, q_offset, Tc, block_len, stride, cu_seqlens, BT):
    """Query tiles that never straddle a document, on the host: rows of (start, end, doc start,
    first k_cmp token of the document, its number of compressed tokens)."""
    if cu_seqlens is None:
        docs = [(0, q_offset + T, 0, Tc)]
    else:
        cu = cu_seqlens.tolist()  # host sync, as the api's own validation of cu_seqlens
        docs, c0 = [], 0
        for a, b in zip(cu, cu[1:]):
            n = num_compressed(b - a, block_len, stride)
            docs.append((a, b, c0, n))
            c0 += n
    parts = []
    for a, b, c0, n in docs:
        lo, hi = max(a, q_offset) - q_offset, min(b, q_offset + T) - q_offset
        if hi > lo:
            s = torch.arange(lo, hi, BT, dtype=torch.int64)
            parts.append(torch.stack([s, (s + BT).clamp(max=hi), torch.full_like(s, a), torch.full_like(s, c0),
                                      torch.full_like(s, n)], 1))
    return torch.cat(parts) if parts else torch.zeros(0, 5, dtype=torch.int64)


def _select_config(R: int, EXTRA: int, G: int):
    """(queries per tile, chunk of compressed tokens, num_warps, num_stages) of the scoring kernel."""
    if _interpreting():
        rows, BC, warps, stages = 16, 16, 4, 1
    else:  # H200, 64k, paper config: 64 rows, 4 warps 15.0 ms; 128 rows, 8 warps 23.8; 128-token chunks 16.9
        rows, BC, warps, stages = 64, (64 if R > 1 else 32), 4, 2
        tuned = os.environ.get("NSA_TRITON_SELECT")  # "rows,chunk,warps,stages": for tuning runs
        if tuned:
            rows, BC, warps, stages = (int(x) for x in tuned.split(","))
    return max(1, rows // _p2(G)), max(BC, _p2(R + EXTRA)), warps, stages


_TOPN_SEGMENT = 2048  # blocks one top-n row holds in registers; longer rows go through per-segment candidates
_SELECT_SCRATCH = 256 << 20  # bytes of block scores held at once; the query axis is chunked to fit


@torch.no_grad()
def select_blocks(q, k_cmp, lse, *, block_len, stride, select_size, top_n, num_init, num_local, scale,
                  q_offset=0, cu_seqlens=None):
    """Top-n selection blocks per (query, KV head): idx `[B, T, H, top_n]` int32, ascending, -1 last.

    q `[B, T, HQ, D]`, k_cmp `[B, Tc, H, D]`, lse `[B, T, HQ]` (from compressed_attention).
    Not differentiable. Ties go to the lower block id, as the reference's stable sort. Block scores
    of a chunk of queries (`[B, chunk, H, blocks]` fp32, at most `_SELECT_SCRATCH` bytes) are the
    only intermediate: nothing of size `[T, T/stride]` is ever written.
    """
    q, k_cmp, lse = q.contiguous(), k_cmp.contiguous(), lse.float().contiguous()
    B, T, HQ, D = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    idx = _output((B, T, H, top_n), torch.int32, q.device, poison=-2)
    if T == 0 or top_n == 0:
        return idx
    GPAD = _p2(G)
    R = select_size // stride
    EXTRA = (block_len - 1) // stride  # tokens starting before a block that still overlap it
    BT, BC, warps, stages = _select_config(R, EXTRA, G)
    STEP = (BC - EXTRA) // R
    BNB = max(16, _p2(STEP))
    seg = 8 if _interpreting() else _TOPN_SEGMENT  # small in the interpreter, so tiny tests cross segments
    tiles = _select_tiles(T, q_offset, Tc, block_len, stride, cu_seqlens, BT)
    tile_blocks = (q_offset + tiles[:, 1] - 1 - tiles[:, 2]) // select_size + 1
    nb_q = (token_layout(q_offset, T, cu_seqlens, q.device).pos // select_size + 1).to(torch.int32)
    widest = int(tile_blocks.max())
    nseg = 1 if widest <= seg else triton.cdiv(widest, seg)
    NBW = _p2(max(widest, 16)) if nseg == 1 else nseg * seg
    QC = min(T, max(BT, _SELECT_SCRATCH // (B * H * NBW * 4) // BT * BT))  # query slots of a chunk
    scores = torch.empty((B, QC, H, NBW), dtype=torch.float32, device=q.device)
    cand = None
    if nseg > 1:
        cand = (torch.empty((B * QC * H * nseg, top_n), dtype=torch.int32, device=q.device),
                torch.empty((B * QC * H * nseg, top_n), dtype=torch.float32, device=q.device))
    tiles_dev = _to_device(tiles, q.device, torch.int32)
    ends = tiles[:, 1].contiguous()
    t0 = 0
    while t0 < tiles.shape[0]:  # query chunks of at most QC queries, split at tile edges
        row0 = int(tiles[t0, 0])
        t1 = max(t0 + 1, int(torch.searchsorted(ends, torch.tensor(row0 + QC), right=True)))
        _block_score_kernel[(t1 - t0, H, B)](
            q, k_cmp, lse, scores, tiles_dev, scale * _LOG2E, T, Tc, HQ, H, G, q_offset, t0, row0, QC, NBW, D,
            block_len, stride, select_size, R, EXTRA, STEP,
            BT=BT, GPAD=GPAD, BC=BC, BNB=BNB, BD=_p2(max(D, 16)), num_warps=warps, num_stages=stages)
        _top_n_rows(scores, nb_q[row0:], idx, int(ends[t1 - 1]) - row0, H, QC, nseg, seg, row0, top_n, cand,
                    num_init, num_local)
        t0 = t1
    return idx


def _top_n_rows(scores, nb_q, idx, NQ, H, QC, nseg, seg, row0, top_n, cand, num_init, num_local):
    """Top-n of the score rows of a chunk's first NQ queries into idx (rows from `row0`): directly,
    or, for rows longer than one segment, top-n per segment into `cand` and then top-n of those."""
    B, T = idx.shape[0], idx.shape[1]
    n_rows, NP = B * QC * H, _p2(top_n)
    # scores per program, warps: 8-16 per thread keep it near 64 registers (32 per thread took 156);
    # H200, 64k: select 14.0 ms at 1024,4, 14.2 at 2048,4, 14.6 at 4096,4
    elems, warps = 1024, 4
    tuned = os.environ.get("NSA_TRITON_TOPN")  # "elems,warps": for tuning runs
    if tuned and not _interpreting():
        elems, warps = (int(x) for x in tuned.split(","))
    common = dict(top_n=top_n, num_init=num_init, num_local=num_local, NP=NP, num_warps=warps)
    if nseg == 1:
        W = scores.shape[-1]
        RB = max(1, elems // W)
        _top_n_kernel[(triton.cdiv(n_rows, RB),)](
            scores, scores, nb_q, idx, scores, n_rows, NQ, H, QC, 1, W, T, row0, W=W, RB=RB,
            CANDIDATES_IN=False, CANDIDATES_OUT=False, **common)
        return
    cand_ids, cand_sc = cand
    RB = max(1, elems // seg)
    _top_n_kernel[(triton.cdiv(n_rows * nseg, RB),)](
        scores, scores, nb_q, cand_ids, cand_sc, n_rows * nseg, NQ, H, QC, nseg, seg, T, row0, W=seg, RB=RB,
        CANDIDATES_IN=False, CANDIDATES_OUT=True, **common)
    width = nseg * top_n
    W = _p2(width)
    RB = max(1, elems // W)
    _top_n_kernel[(triton.cdiv(n_rows, RB),)](
        cand_sc, cand_ids, nb_q, idx, cand_sc, n_rows, NQ, H, QC, 1, width, T, row0, W=W, RB=RB,
        CANDIDATES_IN=True, CANDIDATES_OUT=False, **common)


@triton.jit
def _sel_rows(tile, T, G, BT: tl.constexpr, GPAD: tl.constexpr):
    r = tl.arange(0, BT * GPAD)
    t = tile * BT + r // GPAD
    g = r % GPAD
    return t, g, (t < T) & (g < G)


@triton.jit
def _sel_unit_keys(u, USTART, ULIMIT, UBLK, SEL: tl.constexpr, BS: tl.constexpr):
    """Local key indices of selection unit u (one block of one document), its in-document positions."""
    jj = tl.arange(0, BS)
    kloc = tl.load(USTART + u) + jj
    kpos = tl.load(UBLK + u) * SEL + jj
    k_in = (jj < SEL) & (kloc >= 0) & (kloc < tl.load(ULIMIT + u))
    return kloc, kpos, k_in


@triton.jit
def _sel_fwd_kernel(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, RU, ULIST, UCNT, ESTART, ELIMIT, EBLK, QPOS,
                    qk_scale, scale, T, Tk, HQ, H, G, n, NTILE, LMAX, D: tl.constexpr, DV: tl.constexpr, SEL: tl.constexpr,
                    BT: tl.constexpr, GPAD: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                    BDV: tl.constexpr, DQ_PASS: tl.constexpr):
    """Rows = BT queries x G heads sharing one KV head; loop over the union of their selected units.

    DQ_PASS=False: forward, writes o and lse. DQ_PASS=True: the same loop recomputes p from lse
    and writes dq.
    """
    tile = tl.program_id(0)
    h = tl.program_id(1)
    bb = tl.program_id(2)
    t, g, valid = _sel_rows(tile, T, G, BT, GPAD)
    row = (bb * T + t).to(tl.int64) * HQ + h * G + g
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    pos = tl.load(QPOS + t, mask=valid, other=0)
    cols = tl.arange(0, NP)
    ru = tl.load(RU + ((bb * T + t).to(tl.int64) * H + h)[:, None] * n + cols[None, :],
                 mask=valid[:, None] & (cols[None, :] < n), other=-1)
    lst = (bb * H + h).to(tl.int64) * NTILE + tile
    cnt = tl.load(UCNT + lst)
    kv = bb.to(tl.int64) * Tk * H + h
    if DQ_PASS:
        q, do, lse2, delta = _backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
        dq = tl.zeros([BT * GPAD, BD], tl.float32)
    else:
        q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        m = tl.full([BT * GPAD], float("-inf"), tl.float32)
        l = tl.zeros([BT * GPAD], tl.float32)
        acc = tl.zeros([BT * GPAD, BDV], tl.float32)
    for e in range(0, cnt):
        u = tl.load(ULIST + lst * LMAX + e)
        kloc, kpos, k_in = _sel_unit_keys(lst * LMAX + e, ESTART, ELIMIT, EBLK, SEL, BS)
        kr = kv + kloc.to(tl.int64) * H
        k = tl.load(K + kr[:, None] * D + offs_d[None, :], mask=k_in[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + kr[:, None] * DV + offs_dv[None, :], mask=k_in[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        member = tl.sum((ru == u).to(tl.int32), 1) > 0
        see = member[:, None] & k_in[None, :] & (kpos[None, :] <= pos[:, None])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if DQ_PASS:
            p = tl.where(see, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            dq = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq)
        else:
            s = tl.where(see, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m - m_use)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
    if DQ_PASS:
        tl.store(OUT + row[:, None] * D + offs_d[None, :], (dq * scale).to(OUT.dtype.element_ty),
                 mask=valid[:, None] & (offs_d[None, :] < D))
    else:
        empty = l == 0.0
        o = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / 1.4426950408889634)
        tl.store(OUT + row[:, None] * DV + offs_dv[None, :], o.to(OUT.dtype.element_ty),
                 mask=valid[:, None] & (offs_dv[None, :] < DV))
        tl.store(LSE_OUT + row, lse, mask=valid)


@triton.jit
def _sel_dkdv_kernel(Q, K, V, DO, LSE, DELTA, PDK, PDV, RU, QPOS, ITEM_SEG, ITEM_START, ITEM_END, CSR_TILE,
                     USTART, ULIMIT, UBLK, qk_scale, scale, T, Tk, HQ, H, G, n, NU, D: tl.constexpr, DV: tl.constexpr, SEL: tl.constexpr,
                     BT: tl.constexpr, GPAD: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                     BDV: tl.constexpr, TPI: tl.constexpr):
    """One work item: one unit's (KV head's) keys against a bounded run of the query tiles that chose it,
    TPI tiles per step (their rows side by side: wider MMAs than one tile's BT x G rows).

    With one query per tile (BT = 1) every row of a listed tile chose the unit; with more, the unit
    is in the union of the tile's choices and each query's own list decides."""
    it = tl.program_id(0)
    seg = tl.load(ITEM_SEG + it)
    e0 = tl.load(ITEM_START + it)
    e1 = tl.load(ITEM_END + it)
    u = (seg % NU).to(tl.int32)
    h = ((seg // NU) % H).to(tl.int32)
    bb = (seg // NU // H).to(tl.int32)
    kloc, kpos, k_in = _sel_unit_keys(u, USTART, ULIMIT, UBLK, SEL, BS)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    kr = bb.to(tl.int64) * Tk * H + h + kloc.to(tl.int64) * H
    k = tl.load(K + kr[:, None] * D + offs_d[None, :], mask=k_in[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + kr[:, None] * DV + offs_dv[None, :], mask=k_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
    cols = tl.arange(0, NP)
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BDV], tl.float32)
    r = tl.arange(0, TPI * BT * GPAD)
    slot = r // (BT * GPAD)
    g = r % GPAD
    for e in range(e0, e1, TPI):
        listed = e + slot < e1
        tile = tl.load(CSR_TILE + e + slot, mask=listed, other=0)
        t = tile * BT + (r % (BT * GPAD)) // GPAD
        valid = listed & (t < T) & (g < G)
        row = (bb * T + t).to(tl.int64) * HQ + h * G + g
        if BT > 1:
            ru = tl.load(RU + ((bb * T + t).to(tl.int64) * H + h)[:, None] * n + cols[None, :],
                         mask=valid[:, None] & (cols[None, :] < n), other=-1)
            member = tl.sum((ru == u).to(tl.int32), 1) > 0
        else:
            member = valid
        pos = tl.load(QPOS + t, mask=valid, other=0)
        q, do, lse2, delta = _backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
        see = k_in[:, None] & member[None, :] & (kpos[:, None] <= pos[None, :])
        pT = tl.where(see, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dk = tl.dot((pT * (dpT - delta[None, :])).to(q.dtype), q, dk)
    jj = tl.arange(0, BS)
    tl.store(PDK + it.to(tl.int64) * BS * BD + jj[:, None] * BD + offs_d[None, :], dk * scale)
    tl.store(PDV + it.to(tl.int64) * BS * BDV + jj[:, None] * BDV + offs_dv[None, :], dv)


@triton.jit
def _sel_reduce_kernel(PDK, PDV, DK, DV_OUT, SEG_ITEMS, USTART, ULIMIT, UBLK, Tk, H, NU, D: tl.constexpr, DV: tl.constexpr, SEL: tl.constexpr,
                       BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """Sums a unit's work-item partials in item order (deterministic) and writes its keys' dK, dV."""
    seg = tl.program_id(0).to(tl.int64)
    u = (seg % NU).to(tl.int32)
    h = (seg // NU) % H
    bb = seg // NU // H
    kloc, kpos, k_in = _sel_unit_keys(u, USTART, ULIMIT, UBLK, SEL, BS)
    if tl.max(k_in.to(tl.int32), 0) > 0:
        i0 = tl.load(SEG_ITEMS + seg)
        i1 = tl.load(SEG_ITEMS + seg + 1)
        jj = tl.arange(0, BS)
        offs_d = tl.arange(0, BD)
        offs_dv = tl.arange(0, BDV)
        dk = tl.zeros([BS, BD], tl.float32)
        dv = tl.zeros([BS, BDV], tl.float32)
        for i in range(i0, i1):
            dk += tl.load(PDK + i * BS * BD + jj[:, None] * BD + offs_d[None, :])
            dv += tl.load(PDV + i * BS * BDV + jj[:, None] * BDV + offs_dv[None, :])
        kr = bb * Tk * H + h + kloc.to(tl.int64) * H
        tl.store(DK + kr[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=k_in[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + kr[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=k_in[:, None] & (offs_dv[None, :] < DV))


def _sel_config(G: int):
    """(queries per tile, num_warps, num_stages, query tiles per dK/dV work item, and the dK/dV
    kernel's tiles per step, warps, stages)."""
    GPAD = _p2(G)
    rows = 16  # at least 16 rows: the smallest MMA tile
    if _interpreting():
        BT = max(1, rows // GPAD)
        return BT, 4, 1, 3, 2, 4, 1
    warps, stages = 4, 3  # H200, 64k, selection fwd+bwd: 59.6 ms at 3 stages, 60.6 at 2
    tuned = os.environ.get("NSA_TRITON_SEL")  # "warps,stages,rows": for tuning runs
    if tuned:
        warps, stages, rows = (int(x) for x in tuned.split(","))
    BT = max(1, rows // GPAD)
    dk_rows, dk_warps, dk_stages = 32, 4, 2  # H200, 64k, selection fwd+bwd: rows 32 61.0 ms, 16 65.0, 64 (8 warps) 77.4
    tuned = os.environ.get("NSA_TRITON_SEL_DKDV")  # "rows,warps,stages": for tuning runs
    if tuned:
        dk_rows, dk_warps, dk_stages = (int(x) for x in tuned.split(","))
    return BT, warps, stages, 256, max(1, dk_rows // (BT * GPAD)), dk_warps, dk_stages


def _selection_plan(idx, T, Tk, q_offset, k_offset, cu_seqlens, select_size, BT):
    """Selected blocks as *units* (one block of one document that meets the keys passed in).

    Returns per-query unit ids `ru [B, T, H, n]` (-1: none), per query tile the sorted union of its
    queries' units `ulist [B, H, NTILE, BT*n]` with counts, the units' key start / end (local) and
    block id, and each query's position in its document.
    """
    device = idx.device
    B, _, H, n = idx.shape
    if cu_seqlens is None:
        starts = torch.zeros(1, dtype=torch.int64)
        ends = torch.full((1,), max(q_offset + T, k_offset + Tk), dtype=torch.int64)
    else:
        cu = cu_seqlens.detach().to("cpu", torch.int64)  # host sync, as the api's own validation of cu_seqlens
        starts, ends = cu[:-1], cu[1:]
    k_end = k_offset + Tk
    b_lo = torch.clamp(k_offset - starts, min=0) // select_size
    b_hi = (torch.clamp(torch.minimum(ends, torch.full_like(ends, k_end)) - starts, min=0) + select_size - 1) // select_size
    count = torch.clamp(b_hi - b_lo, min=0)
    first = torch.cumsum(count, 0) - count
    NU = int(count.sum())
    udoc = torch.repeat_interleave(torch.arange(starts.numel()), count)
    ublk = b_lo[udoc] + torch.arange(NU) - first[udoc]
    ustart = starts[udoc] - k_offset + ublk * select_size
    ulimit = torch.minimum(ends[udoc], torch.full_like(ustart, k_end)) - k_offset
    units = [_to_device(x, device, torch.int32) for x in (ustart, ulimit, ublk)]

    qlay = token_layout(q_offset, T, cu_seqlens, device)
    qdoc = qlay.doc if cu_seqlens is not None else torch.zeros_like(qlay.doc)
    base, lo, hi = (_to_device(x, device)[qdoc] for x in (first - b_lo, b_lo, b_hi))
    sel = idx.long()
    ok = (sel >= lo[None, :, None, None]) & (sel < hi[None, :, None, None])
    ru = torch.where(ok, base[None, :, None, None] + sel, torch.full_like(sel, -1))  # (B, T, H, n)

    NTILE = triton.cdiv(T, BT)
    pad = torch.full((B, NTILE * BT - T, H, n), -1, dtype=ru.dtype, device=device)
    per_tile = torch.cat([ru, pad], 1).view(B, NTILE, BT, H, n).permute(0, 3, 1, 2, 4).reshape(B, H, NTILE, BT * n)
    per_tile = torch.where(per_tile < 0, torch.full_like(per_tile, _NO_UNIT), per_tile).sort(-1).values
    dup = torch.zeros_like(per_tile, dtype=torch.bool)
    dup[..., 1:] = per_tile[..., 1:] == per_tile[..., :-1]
    ulist = torch.where(dup, torch.full_like(per_tile, _NO_UNIT), per_tile).sort(-1).values
    ucnt = (ulist != _NO_UNIT).sum(-1)
    u = torch.where(ulist == _NO_UNIT, torch.zeros_like(ulist), ulist)
    per_entry = [x[u].contiguous() if NU else torch.zeros_like(u, dtype=torch.int32) for x in units]  # the units' fields at each list entry
    return dict(ru=ru.to(torch.int32).contiguous(), ulist=ulist.to(torch.int32).contiguous(),
                estart=per_entry[0], elimit=per_entry[1], eblk=per_entry[2],
                ucnt=ucnt.to(torch.int32).contiguous(), ustart=units[0], ulimit=units[1], ublk=units[2],
                qpos=qlay.pos.to(torch.int32), NU=NU, NTILE=NTILE, LMAX=BT * n)


def _selection_work_items(plan, B, H, CH):
    """Reverse index: for each (batch, KV head, unit) the query tiles that chose it (CSR), cut into
    work items of at most CH tiles; `seg_items` gives each unit's run of items for the reduction.

    No host sync: the grid is the bound NI = S + entries / CH on the number of items (a unit with c
    tiles has ceil(c / CH) <= c / CH + 1 of them); items past the real ones have an empty range."""
    ulist, NU, NTILE = plan["ulist"], plan["NU"], plan["NTILE"]
    device = ulist.device
    S = B * H * NU
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    tile = torch.arange(NTILE, device=device, dtype=torch.int64).view(1, 1, NTILE, 1)
    key = (bh * NU + ulist.long()) * NTILE + tile
    key = torch.where(ulist == _NO_UNIT, torch.full_like(key, S * NTILE), key).flatten().sort().values
    csr_tile = (key % NTILE).to(torch.int32)
    seg_off = torch.searchsorted(key, torch.arange(S + 1, device=device, dtype=torch.int64) * NTILE)
    counts = seg_off[1:] - seg_off[:-1]
    seg_off = seg_off[:-1]
    n_items = (counts + CH - 1) // CH
    seg_items = torch.cat([n_items.new_zeros(1), torch.cumsum(n_items, 0)])
    NI = S + triton.cdiv(key.numel(), CH)
    items = torch.arange(NI, device=device, dtype=torch.int64)
    item_seg = (torch.searchsorted(seg_items, items, right=True) - 1).clamp(0, max(S - 1, 0))
    start = seg_off[item_seg] + (items - seg_items[item_seg]) * CH
    end = torch.minimum(start + CH, seg_off[item_seg] + counts[item_seg])
    return item_seg, start, end, csr_tile, seg_items, NI


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_size, scale, q_offset, k_offset, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, HQ, D = q.shape
        Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
        G = HQ // H
        BT, warps, stages, CH, TPI, dk_warps, dk_stages = _sel_config(G)
        plan = _selection_plan(idx, T, Tk, q_offset, k_offset, cu_seqlens, select_size, BT)
        o = _output((B, T, HQ, DV), q.dtype, q.device)
        lse = _output((B, T, HQ), torch.float32, q.device)
        ctx.meta = dict(select_size=select_size, scale=scale, BT=BT, warps=warps, stages=stages, CH=CH,
                        TPI=TPI, dk_warps=dk_warps, dk_stages=dk_stages,
                        NU=plan["NU"], NTILE=plan["NTILE"], LMAX=plan["LMAX"])
        if T:
            _launch_sel(q, k, v, None, lse, None, o, lse, plan, ctx.meta, dq_pass=False)
        ctx.save_for_backward(q, k, v, o, lse, plan["ru"], plan["ulist"], plan["ucnt"], plan["ustart"],
                              plan["ulimit"], plan["ublk"], plan["qpos"], plan["estart"], plan["elimit"],
                              plan["eblk"])
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, ru, ulist, ucnt, ustart, ulimit, ublk, qpos, estart, elimit, eblk = ctx.saved_tensors
        meta = ctx.meta
        plan = dict(ru=ru, ulist=ulist, ucnt=ucnt, ustart=ustart, ulimit=ulimit, ublk=ublk, qpos=qpos,
                    estart=estart, elimit=elimit, eblk=eblk,
                    NU=meta["NU"], NTILE=meta["NTILE"], LMAX=meta["LMAX"])
        B, T, HQ, D = q.shape
        Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
        G = HQ // H
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = _delta(o, do, dlse)
        dq = _output(q.shape, q.dtype, q.device)
        dk = _output(k.shape, k.dtype, k.device)
        dv = _output(v.shape, v.dtype, v.device)
        if T:
            _launch_sel(q, k, v, do, lse, delta, dq, None, plan, meta, dq_pass=True)
        S = B * H * meta["NU"]
        if S:
            item_seg, start, end, csr_tile, seg_items, NI = _selection_work_items(plan, B, H, meta["CH"])
            BS, BD, BDV = _p2(max(meta["select_size"], 16)), _p2(max(D, 16)), _p2(max(DV, 16))
            pdk = torch.empty((max(NI, 1), BS, BD), dtype=torch.float32, device=q.device)
            pdv = torch.empty((max(NI, 1), BS, BDV), dtype=torch.float32, device=q.device)
            common = dict(BS=BS, BD=BD, BDV=BDV)
            if NI:
                _sel_dkdv_kernel[(NI,)](
                    q, k, v, do, lse, delta, pdk, pdv, ru, qpos, item_seg, start, end, csr_tile, ustart, ulimit,
                    ublk, meta["scale"] * _LOG2E, meta["scale"], T, Tk, HQ, H, G, ru.shape[-1], meta["NU"], D, DV,
                    meta["select_size"], BT=meta["BT"], GPAD=_p2(G), NP=_p2(ru.shape[-1]), TPI=meta["TPI"], **common,
                    num_warps=meta["dk_warps"], num_stages=meta["dk_stages"])
            _sel_reduce_kernel[(S,)](pdk, pdv, dk, dv, seg_items, ustart, ulimit, ublk, Tk, H, meta["NU"], D, DV,
                                     meta["select_size"], **common, num_warps=8)
        elif Tk:
            dk.zero_()
            dv.zero_()
        return dq, dk, dv, None, None, None, None, None, None


def _launch_sel(q, k, v, do, lse, delta, out, lse_out, plan, meta, dq_pass):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    n = plan["ru"].shape[-1]
    _sel_fwd_kernel[(plan["NTILE"], H, B)](
        q, k, v, do, lse, delta, out, lse_out, plan["ru"], plan["ulist"], plan["ucnt"], plan["estart"],
        plan["elimit"], plan["eblk"], plan["qpos"], meta["scale"] * _LOG2E, meta["scale"], T, Tk, HQ, H, G, n,
        plan["NTILE"], plan["LMAX"], D, DV, meta["select_size"],
        BT=meta["BT"], GPAD=_p2(G), NP=_p2(n), BS=_p2(max(meta["select_size"], 16)), BD=_p2(max(D, 16)),
        BDV=_p2(max(DV, 16)), DQ_PASS=dq_pass, num_warps=meta["warps"], num_stages=meta["stages"])


def selection_attention(q, k, v, idx, *, select_size, scale, q_offset=0, k_offset=0, cu_seqlens=None,
                        return_lse=False):
    """Attention over the keys of each query's selected blocks, causal inside a block.

    q `[B, T, HQ, D]`, k `[B, Tk, H, D]`, v `[B, Tk, H, Dv]`, idx `[B, T, H, n]` (block ids of the
    query's document, -1 = empty) -> o `[B, T, HQ, Dv]`, and with `return_lse` also lse
    `[B, T, HQ]` fp32 (differentiable; -inf for a query with no key). Keys of a selected block that
    lie outside the k passed in are skipped (the reference raises instead; checking would cost a
    host sync).
    """
    o, lse = _SelectionAttention.apply(q, k, v, idx, select_size, scale, q_offset, k_offset, cu_seqlens)
    return (o, lse) if return_lse else o


@triton.jit
def _gated_sum_fwd_kernel(O1, O2, O3, G1, G2, G3, OUT, n_rows, DV: tl.constexpr, THREE: tl.constexpr,
                          BR: tl.constexpr, BDV: tl.constexpr):
    """out = g1 * o1 + g2 * o2 (+ g3 * o3) per row, in fp32 with one rounding at the end."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BDV)
    r_in = r < n_rows
    at = r[:, None].to(tl.int64) * DV + c[None, :]
    m = r_in[:, None] & (c[None, :] < DV)
    acc = tl.load(G1 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O1 + at, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(G2 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O2 + at, mask=m, other=0.0).to(tl.float32)
    if THREE:
        acc += tl.load(G3 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O3 + at, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gated_sum_branch_grad(DO, O, G, DOB, DG, r, r_in, at, m):
    """d o_b = g_b * d out and d g_b = rowsum(d out * o_b) for one branch."""
    g = tl.load(G + r, mask=r_in, other=0.0).to(tl.float32)
    tl.store(DOB + at, (g[:, None] * DO).to(DOB.dtype.element_ty), mask=m)
    tl.store(DG + r, tl.sum(DO * tl.load(O + at, mask=m, other=0.0).to(tl.float32), 1).to(DG.dtype.element_ty),
             mask=r_in)


@triton.jit
def _gated_sum_bwd_kernel(DOUT, O1, O2, O3, G1, G2, G3, DO1, DO2, DO3, DG1, DG2, DG3, n_rows, DV: tl.constexpr,
                          THREE: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BDV)
    r_in = r < n_rows
    at = r[:, None].to(tl.int64) * DV + c[None, :]
    m = r_in[:, None] & (c[None, :] < DV)
    do = tl.load(DOUT + at, mask=m, other=0.0).to(tl.float32)
    _gated_sum_branch_grad(do, O1, G1, DO1, DG1, r, r_in, at, m)
    _gated_sum_branch_grad(do, O2, G2, DO2, DG2, r, r_in, at, m)
    if THREE:
        _gated_sum_branch_grad(do, O3, G3, DO3, DG3, r, r_in, at, m)


def _three(xs):
    """Two or three tensors as three kernel arguments (a missing third is never read: THREE=False)."""
    return xs + [xs[0]] * (3 - len(xs))


class _GatedSum(torch.autograd.Function):
    """`sum_b g_b * o_b` over two or three branches: one pass forward, one backward, no temporaries."""

    @staticmethod
    def forward(ctx, o1, o2, o3, g1, g2, g3):
        outs = [x.contiguous() for x in (o1, o2, o3) if x is not None]
        gates = [x.contiguous() for x in (g1, g2, g3) if x is not None]
        dtype = outs[0].dtype
        for x in outs[1:] + gates:
            dtype = torch.promote_types(dtype, x.dtype)  # as the eager `g[..., None] * o` would give
        out = torch.empty(outs[0].shape, dtype=dtype, device=outs[0].device)
        B, T, HQ, DV = out.shape
        n, BDV, three = B * T * HQ, _p2(max(DV, 16)), len(outs) == 3
        BR = max(1, 4096 // BDV)
        if n:
            _gated_sum_fwd_kernel[(triton.cdiv(n, BR),)](*_three(outs), *_three(gates), out, n, DV, THREE=three, BR=BR,
                                                        BDV=BDV, num_warps=4)
        ctx.save_for_backward(*outs, *gates)
        ctx.three = three
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        nb = 3 if ctx.three else 2
        outs, gates = list(saved[:nb]), list(saved[nb:])
        dout = dout.contiguous()
        d_outs = [torch.empty_like(o) for o in outs]
        d_gates = [torch.empty_like(g) for g in gates]
        B, T, HQ, DV = dout.shape
        n, BDV = B * T * HQ, _p2(max(DV, 16))
        BR = max(1, 4096 // BDV)
        if n:
            _gated_sum_bwd_kernel[(triton.cdiv(n, BR),)](dout, *_three(outs), *_three(gates), *_three(d_outs),
                                                        *_three(d_gates), n, DV, THREE=ctx.three, BR=BR, BDV=BDV,
                                                        num_warps=4)
        d_outs += [None] * (3 - nb)
        d_gates += [None] * (3 - nb)
        return (*d_outs, *d_gates)


def gated_sum(outputs, gates):
    """`sum_b gates[b][..., None] * outputs[b]` for two or three branches `[B, T, HQ, Dv]`, gates `[B, T, HQ]`."""
    o3, g3 = (outputs[2], gates[2]) if len(outputs) == 3 else (None, None)
    return _GatedSum.apply(outputs[0], outputs[1], o3, gates[0], gates[1], g3)
