"""Selected-block attention: each query over the keys of its n selected blocks.

A selected block is a *unit* (one block of one document, clipped to the keys passed in). The
forward and the dQ pass take, per tile of a few neighbouring queries and all G heads of each, the
union of their units when it is small (queries that share blocks share the K/V loads and MMA
tiles), and otherwise each query of the tile over its own n units with its G heads padded to a
16-row MMA tile; the choice is made per tile from the union's size, on the device. dK/dV comes
from the reverse index (unit -> queries that chose it, CSR) in bounded work items summed in a
fixed order, no atomics (README.md, "Selected-block attention").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .layout import token_layout
from .utils import LOG2E, attention_delta, backward_rows, load_tile, output, p2, store_forward_rows, to_device

_NO_UNIT = 2**31 - 1  # "no selected block" in the unit lists; sorts last


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
def _sel_attend(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, LIST, KSTART, KLIMIT, KBLK, at, cnt,
                t, g, valid, bb, h, qk_scale, scale, T, Tk, HQ, H, G, n, D: tl.constexpr, DV: tl.constexpr,
                SEL: tl.constexpr, ROWS: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                BDV: tl.constexpr, OWN: tl.constexpr, DQ_PASS: tl.constexpr):
    """Rows (t, g) over the `cnt` units listed at LIST + at, then their o and lse (or dq).

    OWN: the list is one query's own idx row (unit ids, -1 = none, any order), so every row chose
    every unit and the key fields are read by unit id. Otherwise it is a tile's sorted union, the key
    fields are stored per list entry, and a row takes a unit only if its query chose it."""
    row = (bb * T + t).to(tl.int64) * HQ + h * G + g
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    pos = tl.load(QPOS + t, mask=valid, other=0)
    kv = bb.to(tl.int64) * Tk * H + h
    if not OWN:
        cols = tl.arange(0, NP)
        ru = tl.load(RU + ((bb * T + t).to(tl.int64) * H + h)[:, None] * n + cols[None, :],
                     mask=valid[:, None] & (cols[None, :] < n), other=-1)
    if DQ_PASS:
        q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
        dq = tl.zeros([ROWS, BD], tl.float32)
    else:
        q = load_tile(Q, row, D, offs_d, valid, D)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BDV], tl.float32)
    for e in range(0, cnt):
        u = tl.load(LIST + at + e)
        if OWN:
            kloc, kpos, k_in = _sel_unit_keys(tl.maximum(u, 0), KSTART, KLIMIT, KBLK, SEL, BS)
            k_in = k_in & (kpos * 0 + u >= 0)  # a vector: the interpreter cannot mask with a scalar's dtype
            see = k_in[None, :] & (kpos[None, :] <= pos[:, None])
        else:
            kloc, kpos, k_in = _sel_unit_keys(at + e, KSTART, KLIMIT, KBLK, SEL, BS)
            member = tl.sum((ru == u).to(tl.int32), 1) > 0
            see = member[:, None] & k_in[None, :] & (kpos[None, :] <= pos[:, None])
        kr = kv + kloc.to(tl.int64) * H
        k = load_tile(K, kr, D, offs_d, k_in, D)
        v = load_tile(V, kr, DV, offs_dv, k_in, DV)
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
        store_forward_rows(OUT, LSE_OUT, row, valid, acc, m, l, offs_dv, DV)


@triton.jit
def _sel_own_queries(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, USTART, ULIMIT, UBLK, tile, bb, h, qk_scale, scale,
                     T, Tk, HQ, H, G, n, D: tl.constexpr, DV: tl.constexpr, SEL: tl.constexpr, BT: tl.constexpr,
                     QROWS: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                     DQ_PASS: tl.constexpr):
    """The tile's queries one at a time, each over its own n units."""
    for j in range(0, tl.minimum(BT, T - tile * BT)):
        t, g, valid = _sel_rows(tile * BT + j, T, G, 1, QROWS)
        at = ((bb * T + tile * BT + j).to(tl.int64) * H + h) * n
        _sel_attend(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, RU, USTART, ULIMIT, UBLK, at, n, t, g, valid, bb, h,
                    qk_scale, scale, T, Tk, HQ, H, G, n, D, DV, SEL, QROWS, NP, BS, BD, BDV, OWN=True, DQ_PASS=DQ_PASS)


@triton.jit
def _sel_fwd_kernel(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, USTART, ULIMIT, UBLK, ULIST, UCNT, ESTART,
                    ELIMIT, EBLK, qk_scale, scale, T, Tk, HQ, H, G, n, NTILE, LMAX, own_above, D: tl.constexpr,
                    DV: tl.constexpr, SEL: tl.constexpr, BT: tl.constexpr, GPAD: tl.constexpr, QROWS: tl.constexpr,
                    NP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DQ_PASS: tl.constexpr):
    """One tile of BT queries of one KV head. DQ_PASS=False: forward, writes o and lse;
    DQ_PASS=True: the same loop recomputes p from lse and writes dq.

    A tile whose union holds more than `own_above` units runs query by query (QROWS rows: the G
    heads padded to an MMA tile), each over its own units: with little sharing the union costs as
    many K/V loads and adds a membership test per unit and row. BT = 1 always runs that way."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    bb = tl.program_id(2)
    if BT == 1:
        _sel_own_queries(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, USTART, ULIMIT, UBLK, tile, bb, h, qk_scale,
                         scale, T, Tk, HQ, H, G, n, D, DV, SEL, BT, QROWS, NP, BS, BD, BDV, DQ_PASS)
    else:
        lst = (bb * H + h).to(tl.int64) * NTILE + tile
        cnt = tl.load(UCNT + lst)
        if cnt > own_above:
            _sel_own_queries(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, USTART, ULIMIT, UBLK, tile, bb, h,
                             qk_scale, scale, T, Tk, HQ, H, G, n, D, DV, SEL, BT, QROWS, NP, BS, BD, BDV, DQ_PASS)
        else:
            t, g, valid = _sel_rows(tile, T, G, BT, GPAD)
            _sel_attend(Q, K, V, DO, LSE, DELTA, OUT, LSE_OUT, QPOS, RU, ULIST, ESTART, ELIMIT, EBLK, lst * LMAX, cnt,
                        t, g, valid, bb, h, qk_scale, scale, T, Tk, HQ, H, G, n, D, DV, SEL, BT * GPAD, NP, BS, BD,
                        BDV, OWN=False, DQ_PASS=DQ_PASS)


@triton.jit
def _sel_dkdv_kernel(Q, K, V, DO, LSE, DELTA, PDK, PDV, QPOS, ITEM_SEG, ITEM_START, ITEM_END, CSR_QUERY,
                     USTART, ULIMIT, UBLK, qk_scale, scale, T, Tk, HQ, H, G, NU, D: tl.constexpr, DV: tl.constexpr,
                     SEL: tl.constexpr, GPAD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                     QPS: tl.constexpr):
    """One work item: one unit's (KV head's) keys against a bounded run of the queries that chose it,
    QPS queries per step (their G heads side by side as the MMA's rows). The CSR lists queries, not
    the forward's tiles: every listed row chose the unit, so no row is spent on a neighbour that
    did not and no membership test is needed."""
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
    k = load_tile(K, kr, D, offs_d, k_in, D)
    v = load_tile(V, kr, DV, offs_dv, k_in, DV)
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BDV], tl.float32)
    r = tl.arange(0, QPS * GPAD)
    slot = r // GPAD
    g = r % GPAD
    for e in range(e0, e1, QPS):
        listed = e + slot < e1
        t = tl.load(CSR_QUERY + e + slot, mask=listed, other=0)
        valid = listed & (g < G)
        row = (bb * T + t).to(tl.int64) * HQ + h * G + g
        pos = tl.load(QPOS + t, mask=valid, other=0)
        q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
        see = k_in[:, None] & valid[None, :] & (kpos[:, None] <= pos[None, :])
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


def _sel_config(table: tuning.Tuning, G: int, D: int, n: int) -> dict:
    """Tiles of the three selection kernels for group size G, head dim D and n blocks per query."""
    GP = p2(G)
    tile, dk = table.sel_for(G, D), table.sel_dkdv
    BT = max(1, tile.rows // GP)
    return dict(BT=BT, GPAD=max(GP, 16 // BT), QROWS=max(16, GP), warps=tile.warps, stages=tile.stages,
                # a tile's union holds at most BT * n units, so a share of 1 or more never goes query by query
                own_above=int(table.sel_own * BT * n) if BT > 1 else -1,
                CH=max(1, table.sel_items // GP), QPS=max(1, max(16, dk.rows) // GP), dk_warps=dk.warps,
                dk_stages=dk.stages)


def _selection_plan(idx, T, Tk, q_offset, k_offset, cu_seqlens, select_size, BT):
    """Selected blocks as *units* (one block of one document that meets the keys passed in).

    Returns per-query unit ids `ru [B, T, H, n]` (-1: none), the units' key start / end (local) and
    block id, each query's position in its document and, for tiles of BT > 1 queries, the sorted
    union of each tile's units `ulist [B, H, NTILE, BT*n]` with counts and the units' fields per entry.
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
    units = [to_device(x, device, torch.int32) for x in (ustart, ulimit, ublk)]

    qlay = token_layout(q_offset, T, cu_seqlens, device)
    qdoc = qlay.doc if cu_seqlens is not None else torch.zeros_like(qlay.doc)
    base, lo, hi = (to_device(x, device)[qdoc] for x in (first - b_lo, b_lo, b_hi))
    sel = idx.long()
    ok = (sel >= lo[None, :, None, None]) & (sel < hi[None, :, None, None])
    ru = torch.where(ok, base[None, :, None, None] + sel, torch.full_like(sel, -1))  # (B, T, H, n)
    plan = dict(ru=ru.to(torch.int32).contiguous(), ustart=units[0], ulimit=units[1], ublk=units[2],
                qpos=qlay.pos.to(torch.int32), NU=NU, NTILE=triton.cdiv(T, BT), LMAX=BT * n)
    if BT == 1:  # every tile runs its one query over its own units: no union lists
        none = torch.zeros(1, dtype=torch.int32, device=device)
        return dict(plan, ulist=none, ucnt=none, estart=none, elimit=none, eblk=none)

    NTILE = plan["NTILE"]
    pad = torch.full((B, NTILE * BT - T, H, n), -1, dtype=ru.dtype, device=device)
    per_tile = torch.cat([ru, pad], 1).view(B, NTILE, BT, H, n).permute(0, 3, 1, 2, 4).reshape(B, H, NTILE, BT * n)
    per_tile = torch.where(per_tile < 0, torch.full_like(per_tile, _NO_UNIT), per_tile).sort(-1).values
    dup = torch.zeros_like(per_tile, dtype=torch.bool)
    dup[..., 1:] = per_tile[..., 1:] == per_tile[..., :-1]
    ulist = torch.where(dup, torch.full_like(per_tile, _NO_UNIT), per_tile).sort(-1).values
    ucnt = (ulist != _NO_UNIT).sum(-1)
    u = torch.where(ulist == _NO_UNIT, torch.zeros_like(ulist), ulist)
    per_entry = [x[u].contiguous() if NU else torch.zeros_like(u, dtype=torch.int32) for x in units]  # the units' fields at each list entry
    return dict(plan, ulist=ulist.to(torch.int32).contiguous(), ucnt=ucnt.to(torch.int32).contiguous(),
                estart=per_entry[0], elimit=per_entry[1], eblk=per_entry[2])


def _selection_work_items(ru, NU, CH):
    """Reverse index: for each (batch, KV head, unit) the queries that chose it (CSR), cut into work
    items of at most CH queries; `seg_items` gives each unit's run of items for the reduction.

    No host sync: the grid is the bound NI = S + entries / CH on the number of items (a unit with c
    queries has ceil(c / CH) <= c / CH + 1 of them); items past the real ones have an empty range."""
    B, T, H, n = ru.shape
    device = ru.device
    S = B * H * NU
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, 1, H, 1)
    query = torch.arange(T, device=device, dtype=torch.int64).view(1, T, 1, 1)
    key = (bh * NU + ru.long()) * T + query  # (B, T, H, n)
    key = torch.where(ru < 0, torch.full_like(key, S * T), key).flatten().sort().values
    csr_query = (key % T).to(torch.int32)
    seg_off = torch.searchsorted(key, torch.arange(S + 1, device=device, dtype=torch.int64) * T)
    counts = seg_off[1:] - seg_off[:-1]
    seg_off = seg_off[:-1]
    n_items = (counts + CH - 1) // CH
    seg_items = torch.cat([n_items.new_zeros(1), torch.cumsum(n_items, 0)])
    NI = S + triton.cdiv(key.numel(), CH)
    items = torch.arange(NI, device=device, dtype=torch.int64)
    item_seg = (torch.searchsorted(seg_items, items, right=True) - 1).clamp(0, max(S - 1, 0))
    start = seg_off[item_seg] + (items - seg_items[item_seg]) * CH
    end = torch.minimum(start + CH, seg_off[item_seg] + counts[item_seg])
    return item_seg, start, end, csr_query, seg_items, NI


def _launch_sel(q, k, v, do, lse, delta, out, lse_out, plan, meta, dq_pass):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    n = plan["ru"].shape[-1]
    _sel_fwd_kernel[(plan["NTILE"], H, B)](
        q, k, v, do, lse, delta, out, lse_out, plan["qpos"], plan["ru"], plan["ustart"], plan["ulimit"], plan["ublk"],
        plan["ulist"], plan["ucnt"], plan["estart"], plan["elimit"], plan["eblk"], meta["scale"] * LOG2E.value,
        meta["scale"], T, Tk, HQ, H, HQ // H, n, plan["NTILE"], plan["LMAX"], meta["own_above"], D, DV,
        meta["select_size"], BT=meta["BT"], GPAD=meta["GPAD"], QROWS=meta["QROWS"], NP=p2(n),
        BS=p2(max(meta["select_size"], 16)), BD=p2(max(D, 16)), BDV=p2(max(DV, 16)), DQ_PASS=dq_pass,
        num_warps=meta["warps"], num_stages=meta["stages"])


_PLAN_TENSORS = ("ru", "ustart", "ulimit", "ublk", "qpos", "ulist", "ucnt", "estart", "elimit", "eblk")


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_size, scale, q_offset, k_offset, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, HQ, D = q.shape
        Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
        meta = _sel_config(tuning.table(q.device), HQ // H, D, idx.shape[-1])
        plan = _selection_plan(idx, T, Tk, q_offset, k_offset, cu_seqlens, select_size, meta["BT"])
        o = output((B, T, HQ, DV), q.dtype, q.device)
        lse = output((B, T, HQ), torch.float32, q.device)
        ctx.meta = dict(meta, select_size=select_size, scale=scale, NU=plan["NU"], NTILE=plan["NTILE"],
                        LMAX=plan["LMAX"])
        if T:
            _launch_sel(q, k, v, None, lse, None, o, lse, plan, ctx.meta, dq_pass=False)
        ctx.save_for_backward(q, k, v, o, lse, *(plan[x] for x in _PLAN_TENSORS))
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *saved = ctx.saved_tensors
        meta = ctx.meta
        plan = dict(zip(_PLAN_TENSORS, saved), NU=meta["NU"], NTILE=meta["NTILE"], LMAX=meta["LMAX"])
        B, T, HQ, D = q.shape
        Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
        G = HQ // H
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = attention_delta(o, do, dlse)
        dq = output(q.shape, q.dtype, q.device)
        dk = output(k.shape, k.dtype, k.device)
        dv = output(v.shape, v.dtype, v.device)
        if T:
            _launch_sel(q, k, v, do, lse, delta, dq, None, plan, meta, dq_pass=True)
        S = B * H * meta["NU"]
        if S:
            item_seg, start, end, csr_query, seg_items, NI = _selection_work_items(plan["ru"], meta["NU"], meta["CH"])
            BS, BD, BDV = p2(max(meta["select_size"], 16)), p2(max(D, 16)), p2(max(DV, 16))
            pdk = torch.empty((max(NI, 1), BS, BD), dtype=torch.float32, device=q.device)
            pdv = torch.empty((max(NI, 1), BS, BDV), dtype=torch.float32, device=q.device)
            common = dict(BS=BS, BD=BD, BDV=BDV)
            if NI:
                _sel_dkdv_kernel[(NI,)](
                    q, k, v, do, lse, delta, pdk, pdv, plan["qpos"], item_seg, start, end, csr_query, plan["ustart"],
                    plan["ulimit"], plan["ublk"], meta["scale"] * LOG2E.value, meta["scale"], T, Tk, HQ, H, G,
                    meta["NU"], D, DV, meta["select_size"], GPAD=p2(G), QPS=meta["QPS"], **common,
                    num_warps=meta["dk_warps"], num_stages=meta["dk_stages"])
            _sel_reduce_kernel[(S,)](pdk, pdv, dk, dv, seg_items, plan["ustart"], plan["ulimit"], plan["ublk"], Tk, H,
                                     meta["NU"], D, DV, meta["select_size"], **common, num_warps=8)
        elif Tk:
            dk.zero_()
            dv.zero_()
        return dq, dk, dv, None, None, None, None, None, None


def selection_attention(q, k, v, idx, *, select_size, scale, q_offset=0, k_offset=0, cu_seqlens=None,
                        return_lse=False):
    """Attention over the keys of each query's selected blocks, causal inside a block.

    q `[B, T, HQ, D]`, k `[B, Tk, H, D]`, v `[B, Tk, H, Dv]`, idx `[B, T, H, n]` (block ids of the
    query's document, -1 = empty) -> o `[B, T, HQ, Dv]`, and with `return_lse` also lse
    `[B, T, HQ]` fp32 (differentiable; -inf for a query with no key). Keys of a selected block that
    lie outside the k passed in are skipped: `api.selection_attention` rejects such an idx first.
    """
    o, lse = _SelectionAttention.apply(q, k, v, idx, select_size, scale, q_offset, k_offset, cu_seqlens)
    return (o, lse) if return_lse else o
