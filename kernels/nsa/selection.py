"""Selected-block attention: each query over the keys of its n selected blocks.

A selected block is a *unit* (one block of one document, clipped to the keys passed in). The
forward and the dQ pass loop, per tile of a few neighbouring queries and all G heads of each, over
the union of their units, so small groups still fill a 16-row MMA tile; dK/dV comes from the
reverse index (unit -> query tiles, CSR) in bounded work items summed in a fixed order, no atomics
(README.md, "Selected-block attention").
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
        q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
        dq = tl.zeros([BT * GPAD, BD], tl.float32)
    else:
        q = load_tile(Q, row, D, offs_d, valid, D)
        m = tl.full([BT * GPAD], float("-inf"), tl.float32)
        l = tl.zeros([BT * GPAD], tl.float32)
        acc = tl.zeros([BT * GPAD, BDV], tl.float32)
    for e in range(0, cnt):
        u = tl.load(ULIST + lst * LMAX + e)
        kloc, kpos, k_in = _sel_unit_keys(lst * LMAX + e, ESTART, ELIMIT, EBLK, SEL, BS)
        kr = kv + kloc.to(tl.int64) * H
        k = load_tile(K, kr, D, offs_d, k_in, D)
        v = load_tile(V, kr, DV, offs_dv, k_in, DV)
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
        store_forward_rows(OUT, LSE_OUT, row, valid, acc, m, l, offs_dv, DV)


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
    k = load_tile(K, kr, D, offs_d, k_in, D)
    v = load_tile(V, kr, DV, offs_dv, k_in, DV)
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
        q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, row, valid, D, DV, BD, BDV)
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


def _sel_config(table: tuning.Tuning, G: int):
    """(queries per tile, num_warps, num_stages, query tiles per dK/dV work item, and the dK/dV
    kernel's tiles per step, warps, stages)."""
    GPAD = p2(G)
    BT = max(1, table.sel.rows // GPAD)
    dk = table.sel_dkdv
    return BT, table.sel.warps, table.sel.stages, table.sel_items, max(1, dk.rows // (BT * GPAD)), dk.warps, dk.stages


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
    units = [to_device(x, device, torch.int32) for x in (ustart, ulimit, ublk)]

    qlay = token_layout(q_offset, T, cu_seqlens, device)
    qdoc = qlay.doc if cu_seqlens is not None else torch.zeros_like(qlay.doc)
    base, lo, hi = (to_device(x, device)[qdoc] for x in (first - b_lo, b_lo, b_hi))
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


def _launch_sel(q, k, v, do, lse, delta, out, lse_out, plan, meta, dq_pass):
    B, T, HQ, D = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    n = plan["ru"].shape[-1]
    _sel_fwd_kernel[(plan["NTILE"], H, B)](
        q, k, v, do, lse, delta, out, lse_out, plan["ru"], plan["ulist"], plan["ucnt"], plan["estart"],
        plan["elimit"], plan["eblk"], plan["qpos"], meta["scale"] * LOG2E.value, meta["scale"], T, Tk, HQ, H, G, n,
        plan["NTILE"], plan["LMAX"], D, DV, meta["select_size"],
        BT=meta["BT"], GPAD=p2(G), NP=p2(n), BS=p2(max(meta["select_size"], 16)), BD=p2(max(D, 16)),
        BDV=p2(max(DV, 16)), DQ_PASS=dq_pass, num_warps=meta["warps"], num_stages=meta["stages"])


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_size, scale, q_offset, k_offset, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, HQ, D = q.shape
        Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
        G = HQ // H
        BT, warps, stages, CH, TPI, dk_warps, dk_stages = _sel_config(tuning.table(q.device), G)
        plan = _selection_plan(idx, T, Tk, q_offset, k_offset, cu_seqlens, select_size, BT)
        o = output((B, T, HQ, DV), q.dtype, q.device)
        lse = output((B, T, HQ), torch.float32, q.device)
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
        delta = attention_delta(o, do, dlse)
        dq = output(q.shape, q.dtype, q.device)
        dk = output(k.shape, k.dtype, k.device)
        dv = output(v.shape, v.dtype, v.device)
        if T:
            _launch_sel(q, k, v, do, lse, delta, dq, None, plan, meta, dq_pass=True)
        S = B * H * meta["NU"]
        if S:
            item_seg, start, end, csr_tile, seg_items, NI = _selection_work_items(plan, B, H, meta["CH"])
            BS, BD, BDV = p2(max(meta["select_size"], 16)), p2(max(D, 16)), p2(max(DV, 16))
            pdk = torch.empty((max(NI, 1), BS, BD), dtype=torch.float32, device=q.device)
            pdv = torch.empty((max(NI, 1), BS, BDV), dtype=torch.float32, device=q.device)
            common = dict(BS=BS, BD=BD, BDV=BDV)
            if NI:
                _sel_dkdv_kernel[(NI,)](
                    q, k, v, do, lse, delta, pdk, pdv, ru, qpos, item_seg, start, end, csr_tile, ustart, ulimit,
                    ublk, meta["scale"] * LOG2E.value, meta["scale"], T, Tk, HQ, H, G, ru.shape[-1], meta["NU"], D, DV,
                    meta["select_size"], BT=meta["BT"], GPAD=p2(G), NP=p2(ru.shape[-1]), TPI=meta["TPI"], **common,
                    num_warps=meta["dk_warps"], num_stages=meta["dk_stages"])
            _sel_reduce_kernel[(S,)](pdk, pdv, dk, dv, seg_items, ustart, ulimit, ublk, Tk, H, meta["NU"], D, DV,
                                     meta["select_size"], **common, num_warps=8)
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
