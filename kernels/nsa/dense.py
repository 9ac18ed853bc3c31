"""Compressed and sliding-window attention: one FlashAttention-style tiled kernel family.

Each query sees one interval of keys `[lo_t, hi_t)` computed on the host from positions (the
compressed tokens whose whole block lies in its past, or the window band of its document). Rows
of a tile are (query, head) pairs of one KV group, so the group shares each K/V load. Backward:
dQ per row tile, dK/dV per key tile over the query range that sees it; no atomics (README.md,
"Dense family").
"""
from __future__ import annotations

import bisect

import torch
import triton
import triton.language as tl

from . import tuning
from .layout import compressed_layout, token_layout
from .utils import LOG2E, attention_delta, backward_rows, load_tile, output, p2, store_forward_rows

_POS_KEY = 1 << 40  # separates documents in the (document, position) sort keys
_DKDV_MAX_SPLITS = 64  # bounds the fp32 partial buffers of the split


@triton.jit
def _row_layout(T, G, NGC, BT: tl.constexpr, GP: tl.constexpr):
    """This program's rows: BT queries x GP heads of one KV group (KV head and head chunk from program_id(1)).
    Returns the batch, KV head, query and query head of each row, and which rows exist."""
    pid_t = tl.program_id(0)
    pid_hg = tl.program_id(1)
    bb = tl.program_id(2)
    h = pid_hg // NGC
    gc = pid_hg % NGC
    r = tl.arange(0, BT * GP)
    t = pid_t * BT + r // GP
    g = gc * GP + r % GP
    valid = (t < T) & (g < G)
    return bb, h, t, h * G + g, valid


@triton.jit
def _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, k_row, v_row, offs_d, offs_dv, lo, hi, start, end, Tk,
                     D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr):
    offs_n = tl.arange(0, BN)
    for j0 in range(start, end, BN):
        kj = j0 + offs_n
        k = load_tile(k_base, kj, k_row, offs_d, kj < Tk, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where((kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = load_tile(v_base, kj, v_row, offs_dv, kj < Tk, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    return acc, m, l


@triton.jit
def _tile_ranges(LO, HI, t, valid, Tk, BN: tl.constexpr):
    """The rows' key intervals [lo, hi) and the key-tile ranges of the row tile: [a, b1) masked,
    [b1, b2) every row sees every key, [b2, e) masked."""
    lo = tl.load(LO + t, mask=valid, other=0)
    hi = tl.load(HI + t, mask=valid, other=0)
    min_lo = tl.min(tl.where(valid, lo, Tk), 0)
    max_lo = tl.max(tl.where(valid, lo, 0), 0)
    min_hi = tl.min(tl.where(valid, hi, Tk), 0)
    max_hi = tl.max(tl.where(valid, hi, 0), 0)
    a = (min_lo // BN) * BN
    e = max_hi
    b1 = tl.minimum(tl.cdiv(max_lo, BN) * BN, e)
    b1 = tl.maximum(b1, a)
    b2 = tl.maximum(b1, tl.minimum((min_hi // BN) * BN, e))
    return lo, hi, a, b1, b2, e


@triton.jit
def _dense_fwd_kernel(Q, K, V, O, LSE, LO, HI, qk_scale, T, Tk, HQ, H, G, NGC, D: tl.constexpr, DV: tl.constexpr,
                      BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      BDV: tl.constexpr):
    bb, h, t, hq, valid = _row_layout(T, G, NGC, BT, GP)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row = (bb * T + t).to(tl.int64) * HQ + hq
    q = load_tile(Q, row, D, offs_d, valid, D)
    lo, hi, a, b1, b2, e = _tile_ranges(LO, HI, t, valid, Tk, BN)
    k_base = K + (bb.to(tl.int64) * Tk * H + h) * D
    v_base = V + (bb.to(tl.int64) * Tk * H + h) * DV
    m = tl.full([BT * GP], float("-inf"), tl.float32)
    l = tl.zeros([BT * GP], tl.float32)
    acc = tl.zeros([BT * GP, BDV], tl.float32)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi,
                                   a, b1, Tk, D, DV, BN, True)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi,
                                   b1, b2, Tk, D, DV, BN, False)
    acc, m, l = _dense_fwd_inner(acc, m, l, q, qk_scale, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi,
                                   b2, e, Tk, D, DV, BN, True)
    store_forward_rows(O, LSE, row, valid, acc, m, l, offs_dv, DV)


@triton.jit
def _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, k_row, v_row, offs_d, offs_dv, lo, hi, start, end,
                    Tk, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr):
    offs_n = tl.arange(0, BN)
    for j0 in range(start, end, BN):
        kj = j0 + offs_n
        kin = kj < Tk
        k = load_tile(k_base, kj, k_row, offs_d, kin, D)
        v = load_tile(v_base, kj, v_row, offs_dv, kin, DV)
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
    bb, h, t, hq, valid = _row_layout(T, G, NGC, BT, GP)
    offs_d = tl.arange(0, BD)
    row = (bb * T + t).to(tl.int64) * HQ + hq
    q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
    lo, hi, a, b1, b2, e = _tile_ranges(LO, HI, t, valid, Tk, BN)
    k_base = K + (bb.to(tl.int64) * Tk * H + h) * D
    v_base = V + (bb.to(tl.int64) * Tk * H + h) * DV
    offs_dv = tl.arange(0, BDV)
    dq = tl.zeros([BT * GP, BD], tl.float32)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi, a, b1, Tk,
                         D, DV, BN, True)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi, b1, b2, Tk,
                         D, DV, BN, False)
    dq = _dense_dq_inner(dq, q, qk_scale, do, lse2, delta, k_base, v_base, H * D, H * DV, offs_d, offs_dv, lo, hi, b2, e, Tk,
                         D, DV, BN, True)
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
        q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, (bb * T + t).to(tl.int64) * HQ + hq, valid, D, DV, BD,
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
    k = load_tile(K, krow, D, offs_d, kin, D)
    v = load_tile(V, krow, DV, offs_dv, kin, DV)
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


def _dense_tile(table: tuning.Tuning, kind: str, D: int, DV: int) -> tuning.DenseTile:
    return getattr(table, f"dense_{kind}_wide" if max(D, DV) > 128 else f"dense_{kind}")


def _dense_config(tile: tuning.DenseTile, G: int):
    """(heads per tile, queries per tile, keys per tile, num_warps, num_stages) of one dense kernel."""
    GP = min(p2(G), 16)
    rows = max(tile.rows, GP)
    return GP, rows // GP, tile.keys, tile.warps, tile.stages


def _dense_forward(q, k, v, lo, hi, scale):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP, BT, BN, warps, stages = _dense_config(_dense_tile(tuning.table(q.device), "fwd", D, DV), G)
    NGC = triton.cdiv(G, GP)
    o = output((B, T, HQ, DV), q.dtype, q.device)
    lse = output((B, T, HQ), torch.float32, q.device)
    if T == 0:
        return o, lse
    grid = (triton.cdiv(T, BT), H * NGC, B)
    _dense_fwd_kernel[grid](q, k, v, o, lse, lo, hi, scale * LOG2E.value, T, Tk, HQ, H, G, NGC, D, DV,
                            BT=BT, GP=GP, BN=BN, BD=p2(max(D, 16)), BDV=p2(max(DV, 16)),
                            num_warps=warps, num_stages=stages)
    return o, lse


def _dense_backward(q, k, v, o, lse, do, dlse, lo, hi, scale, span):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    do = do.contiguous()
    delta = attention_delta(o, do, dlse)  # (B, T, HQ)
    dq = output(q.shape, q.dtype, q.device)
    dk = output(k.shape, k.dtype, k.device)
    dv = output(v.shape, v.dtype, v.device)
    BD, BDV = p2(max(D, 16)), p2(max(DV, 16))
    table = tuning.table(q.device)
    keys = torch.arange(Tk, device=q.device, dtype=lo.dtype)
    qlo = torch.searchsorted(hi, keys, right=True).to(torch.int32)  # first query whose interval ends after key j
    qhi = torch.searchsorted(lo, keys, right=True).to(torch.int32)  # one past the last query whose interval starts <= j
    if T:
        GP, BT, BN, warps, stages = _dense_config(_dense_tile(table, "dq", D, DV), G)
        NGC = triton.cdiv(G, GP)
        _dense_dq_kernel[(triton.cdiv(T, BT), H * NGC, B)](
            q, k, v, do, lse, delta, dq, lo, hi, scale * LOG2E.value, scale, T, Tk, HQ, H, G, NGC, D, DV,
            BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, num_warps=warps, num_stages=stages)
    if Tk:
        tile = _dense_tile(table, "dkdv", D, DV)
        GP, BT, BN, warps, stages = _dense_config(tile, G)
        NGC = triton.cdiv(G, GP)
        # `span` bounds the queries one key tile meets: split the query axis only when that is long
        QS = BT * max(1, table.dense_dkdv_iters // NGC)
        n_split = 1 if min(span, T) <= 4 * QS else min(triton.cdiv(T, QS), _DKDV_MAX_SPLITS)
        QS = triton.cdiv(triton.cdiv(T + BT, n_split), BT) * BT
        partial = n_split > 1
        if partial:
            pdk = torch.empty((n_split, B, Tk, H, BD), dtype=torch.float32, device=q.device)
            pdv = torch.empty((n_split, B, Tk, H, BDV), dtype=torch.float32, device=q.device)
        _dense_dkdv_kernel[(triton.cdiv(Tk, BN), H * n_split, B)](
            q, k, v, do, lse, delta, pdk if partial else dk, pdv if partial else dv, lo, hi, qlo, qhi,
            scale * LOG2E.value, scale, T, Tk, HQ, H, G, NGC, QS, D, DV,
            BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, PARTIAL=partial, ROWS_MAJOR=tile.rows_major,
            num_warps=warps, num_stages=stages)
        if partial:  # a fixed-order sum over the splits: deterministic
            dk.copy_(pdk.sum(0)[..., :D])
            dv.copy_(pdv.sum(0)[..., :DV])
    return dq, dk, dv


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

