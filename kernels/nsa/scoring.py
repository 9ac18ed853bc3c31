"""Block selection (Eq. 8-10 and top-n) without a `[T, T/d]` score matrix in HBM.

`_block_score_kernel` sums the compression branch's softmax over the group and maps it onto
selection blocks (Eq. 9) chunk by chunk into a bounded buffer of per-block scores; `_top_n_kernel`
then picks each row's top n exactly and sort-free, by a binary search over the scores' bits
(README.md, "Selection scores and top-n"). Not differentiable, so no autograd.Function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .layout import num_compressed, token_layout
from .utils import LOG2E, output, p2, to_device

_SELECT_SCRATCH = 256 << 20  # bytes of block scores held at once; the query axis is chunked to fit


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
    lse2 = tl.where(tl.abs(lse) < float("inf"), lse * LOG2E, 0.0)  # the reference's rule for -inf
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


def _select_config(table: tuning.Tuning, R: int, EXTRA: int, G: int):
    """(queries per tile, chunk of compressed tokens, num_warps, num_stages) of the scoring kernel."""
    tile = table.select if R > 1 else table.select_r1
    return max(1, tile.rows // p2(G)), max(tile.chunk, p2(R + EXTRA)), tile.warps, tile.stages


def _top_n_rows(tile, scores, nb_q, idx, NQ, H, QC, nseg, seg, row0, top_n, cand, num_init, num_local):
    """Top-n of the score rows of a chunk's first NQ queries into idx (rows from `row0`): directly,
    or, for rows longer than one segment, top-n per segment into `cand` and then top-n of those."""
    B, T = idx.shape[0], idx.shape[1]
    n_rows, NP = B * QC * H, p2(top_n)
    elems, warps = tile.elems, tile.warps  # scores per program
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
    W = p2(width)
    RB = max(1, elems // W)
    _top_n_kernel[(triton.cdiv(n_rows, RB),)](
        cand_sc, cand_ids, nb_q, idx, cand_sc, n_rows, NQ, H, QC, 1, width, T, row0, W=W, RB=RB,
        CANDIDATES_IN=True, CANDIDATES_OUT=False, **common)


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
    idx = output((B, T, H, top_n), torch.int32, q.device, poison=-2)
    if T == 0 or top_n == 0:
        return idx
    GPAD = p2(G)
    R = select_size // stride
    EXTRA = (block_len - 1) // stride  # tokens starting before a block that still overlap it
    table = tuning.table(q.device)
    BT, BC, warps, stages = _select_config(table, R, EXTRA, G)
    STEP = (BC - EXTRA) // R
    BNB = max(16, p2(STEP))
    seg = table.topn_segment
    tiles = _select_tiles(T, q_offset, Tc, block_len, stride, cu_seqlens, BT)
    tile_blocks = (q_offset + tiles[:, 1] - 1 - tiles[:, 2]) // select_size + 1
    nb_q = (token_layout(q_offset, T, cu_seqlens, q.device).pos // select_size + 1).to(torch.int32)
    widest = int(tile_blocks.max())
    nseg = 1 if widest <= seg else triton.cdiv(widest, seg)
    NBW = p2(max(widest, 16)) if nseg == 1 else nseg * seg
    QC = min(T, max(BT, _SELECT_SCRATCH // (B * H * NBW * 4) // BT * BT))  # query slots of a chunk
    scores = torch.empty((B, QC, H, NBW), dtype=torch.float32, device=q.device)
    cand = None
    if nseg > 1:
        cand = (torch.empty((B * QC * H * nseg, top_n), dtype=torch.int32, device=q.device),
                torch.empty((B * QC * H * nseg, top_n), dtype=torch.float32, device=q.device))
    tiles_dev = to_device(tiles, q.device, torch.int32)
    ends = tiles[:, 1].contiguous()
    t0 = 0
    while t0 < tiles.shape[0]:  # query chunks of at most QC queries, split at tile edges
        row0 = int(tiles[t0, 0])
        t1 = max(t0 + 1, int(torch.searchsorted(ends, torch.tensor(row0 + QC), right=True)))
        _block_score_kernel[(t1 - t0, H, B)](
            q, k_cmp, lse, scores, tiles_dev, scale * LOG2E.value, T, Tc, HQ, H, G, q_offset, t0, row0, QC, NBW, D,
            block_len, stride, select_size, R, EXTRA, STEP,
            BT=BT, GPAD=GPAD, BC=BC, BNB=BNB, BD=p2(max(D, 16)), num_warps=warps, num_stages=stages)
        _top_n_rows(table.topn, scores, nb_q[row0:], idx, int(ends[t1 - 1]) - row0, H, QC, nseg, seg, row0, top_n, cand,
                    num_init, num_local)
        t0 = t1
    return idx


