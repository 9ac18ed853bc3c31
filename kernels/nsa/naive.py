"""Pure-PyTorch NSA ops in fp32: the reference every other backend is tested against.

Same signatures as the public ops in `api.py` (which validate the arguments and dispatch here) and
as the Triton ops (`dense.py`, `scoring.py`, `selection.py`).
Queries are processed in chunks so that memory stays bounded at long lengths; each chunk only
touches the keys it can see. The math and the causal rules are in README.md beside this file.
"""
from __future__ import annotations

import torch

from .layout import compressed_layout, token_layout

_CHUNK_ELEMENTS = 1 << 25  # scores held at once per chunk: bounds the reference's memory


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32, or fp64 when the input already is."""
    return t if t.dtype == torch.float64 else t.float()


def _query_chunks(T: int, per_query: int, max_step: int | None = None):
    step = max(1, min(T, _CHUNK_ELEMENTS // max(1, per_query), max_step or T))
    for s in range(0, T, step):
        yield s, min(T, s + step)


def _masked_softmax_attention(s: torch.Tensor, valid: torch.Tensor, v_of_s):
    """Softmax over the last dim of `s` where `valid`; rows with no valid key give 0 and lse -inf.

    Rows with nothing visible keep their (finite) scores for the softmax and are zeroed after,
    so their gradients are exactly 0 rather than NaN.
    """
    empty = ~valid.any(-1, keepdim=True)
    s = s.masked_fill(~(valid | empty), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * (~empty)
    return v_of_s(p), lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf"))


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale, q_offset=0, cu_seqlens=None):
    B, T, HQ, D = q.shape
    _, Tc, H, _ = k_cmp.shape
    G = HQ // H
    qf, kf, vf = _acc(q), _acc(k_cmp), _acc(v_cmp)
    qlay = token_layout(q_offset, T, cu_seqlens, q.device)
    cdoc, cidx = compressed_layout(Tc, block_len, stride, cu_seqlens, q.device)
    cend = cidx * stride + block_len - 1  # position of the last key each compressed token covers
    outs, lses = [], []
    for s, e in _query_chunks(T, HQ * max(Tc, 1)):
        qc = qf[:, s:e].unflatten(2, (H, G))  # (B, C, H, G, D)
        scores = torch.einsum("bchgd,bkhd->bchgk", qc, kf) * scale  # (B, C, H, G, Tc)
        valid = (cdoc[None, :] == qlay.doc[s:e, None]) & (cend[None, :] <= qlay.pos[s:e, None])  # (C, Tc)
        valid = valid[None, :, None, None, :].expand_as(scores)
        o, lse = _masked_softmax_attention(scores, valid, lambda p: torch.einsum("bchgk,bkhd->bchgd", p, vf))
        outs.append(o.flatten(2, 3))
        lses.append(lse.flatten(2, 3))
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, HQ, v_cmp.shape[-1], dtype=torch.float32)
    lse = torch.cat(lses, 1) if lses else q.new_zeros(B, 0, HQ, dtype=torch.float32)
    return o.to(q.dtype), lse


def block_overlap_weights(num_cmp: int, num_blocks: int, block_len: int, stride: int, select_size: int, device):
    """`W[i, j]` = keys shared by compressed token `i` and selection block `j`, divided by `stride`.

    For l=32, d=16, l'=64 this is weight 1,2,2,2,1 on compressed tokens 4j-1 .. 4j+3 (Eq. 9 with
    the index aligned to the keys the compressed tokens cover; see README.md).
    """
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    lo = torch.maximum(i * stride, j * select_size)
    hi = torch.minimum(i * stride + block_len, (j + 1) * select_size)
    return (hi - lo).clamp(min=0).float() / stride


@torch.no_grad()
def select_blocks(q, k_cmp, lse, *, block_len, stride, select_size, top_n, num_init, num_local, scale,
                  q_offset=0, cu_seqlens=None):
    B, T, HQ, D = q.shape
    _, Tc, H, _ = k_cmp.shape
    G = HQ // H
    qf, kf = _acc(q), _acc(k_cmp)
    qlay = token_layout(q_offset, T, cu_seqlens, q.device)
    cdoc, cidx = compressed_layout(Tc, block_len, stride, cu_seqlens, q.device)
    cend = cidx * stride + block_len - 1
    max_pos = int(qlay.pos.max()) + 1 if T else 1
    num_blocks = (max_pos + select_size - 1) // select_size
    # W maps compressed tokens (numbered inside their document) to blocks of that document.
    W = block_overlap_weights(int(cidx.max()) + 1 if Tc else 0, num_blocks, block_len, stride, select_size, q.device)
    W_per_token = W[cidx] if Tc else W.new_zeros(0, num_blocks)  # (Tc, NB)
    blk = torch.arange(num_blocks, device=q.device)
    out = []
    for s, e in _query_chunks(T, HQ * max(Tc, num_blocks, 1)):
        qc = qf[:, s:e].unflatten(2, (H, G))
        scores = torch.einsum("bchgd,bkhd->bchgk", qc, kf) * scale  # (B, C, H, G, Tc)
        valid = (cdoc[None, :] == qlay.doc[s:e, None]) & (cend[None, :] <= qlay.pos[s:e, None])  # (C, Tc)
        l = lse[:, s:e].to(qf.dtype).unflatten(2, (H, G))[..., None]
        p = torch.exp(scores - torch.where(torch.isfinite(l), l, torch.zeros_like(l)))
        p = p * valid[None, :, None, None, :]  # p_cmp, Eq. 8
        p_blk = torch.einsum("bchgk,kj->bchj", p, W_per_token.to(p.dtype))  # Eq. 9 mapping, Eq. 10 group sum
        pos = qlay.pos[s:e, None]  # (C, 1)
        q_blk = pos // select_size
        causal = blk[None, :] * select_size <= pos  # no future block
        forced = (blk[None, :] < num_init) | ((q_blk - blk[None, :] >= 0) & (q_blk - blk[None, :] < num_local))
        score = p_blk.masked_fill(forced[None, :, None, :], float("inf"))
        score = score.masked_fill(~causal[None, :, None, :], float("-inf"))
        k = min(top_n, num_blocks)
        # stable sort: equal scores keep the lower block id first, so selection is deterministic
        order = torch.sort(score, dim=-1, descending=True, stable=True)
        chosen = order.indices[..., :k]
        chosen = torch.where(torch.isneginf(order.values[..., :k]), torch.full_like(chosen, -1), chosen)
        if k < top_n:
            chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:-1], top_n - k), -1)], -1)
        out.append(chosen)
    idx = torch.cat(out, 1) if out else q.new_zeros(B, 0, H, top_n, dtype=torch.int64)
    return sort_block_ids(idx).to(torch.int32)


def sort_block_ids(idx: torch.Tensor) -> torch.Tensor:
    """Block ids ascending, the empty slots (-1) last."""
    big = torch.iinfo(idx.dtype).max
    srt = torch.sort(torch.where(idx < 0, torch.full_like(idx, big), idx), dim=-1).values
    return torch.where(srt == big, torch.full_like(srt, -1), srt)


def selection_attention(q, k, v, idx, *, select_size, scale, q_offset=0, k_offset=0, cu_seqlens=None,
                        return_lse=False):
    B, T, HQ, D = q.shape
    _, Tk, H, Dv = v.shape
    G = HQ // H
    n = idx.shape[-1]
    qf, kf, vf = _acc(q), _acc(k), _acc(v)
    qlay = token_layout(q_offset, T, cu_seqlens, q.device)
    offs = torch.arange(select_size, device=q.device)
    outs, lses = [], []
    for s, e in _query_chunks(T, HQ * n * select_size + H * n * select_size * (D + Dv) // max(G, 1)):
        lo = max(0, int(qlay.doc_start[s]) - k_offset)
        hi = min(Tk, q_offset + e - k_offset)
        if hi - lo <= n * select_size:  # short range: masking all keys is cheaper than gathering blocks
            o, lse = _selection_dense(qf[:, s:e], kf, vf, idx[:, s:e].long(), qlay, s, e, lo, hi, select_size, scale,
                                      k_offset, cu_seqlens)
            outs.append(o)
            lses.append(lse)
            continue
        ic = idx[:, s:e].long()  # (B, C, H, n)
        kpos = (ic[..., None] * select_size + offs).flatten(-2)  # (B, C, H, n*l') position in document
        pos = qlay.pos[s:e].view(1, -1, 1, 1)
        g = qlay.doc_start[s:e].view(1, -1, 1, 1) + kpos
        valid = (ic >= 0).repeat_interleave(select_size, -1) & (kpos <= pos) & (g < qlay.doc_end[s:e].view(1, -1, 1, 1))
        local = (g - k_offset).clamp(0, max(Tk - 1, 0))  # api.selection_attention rejects valid keys outside k
        bidx = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        hidx = torch.arange(H, device=q.device).view(1, 1, H, 1)
        kc = kf[bidx, local, hidx]  # (B, C, H, n*l', D)
        vc = vf[bidx, local, hidx]
        qc = qf[:, s:e].unflatten(2, (H, G))  # (B, C, H, G, D)
        scores = torch.einsum("bchgd,bchkd->bchgk", qc, kc) * scale
        val = valid[:, :, :, None, :].expand_as(scores)
        o, lse = _masked_softmax_attention(scores, val, lambda p: torch.einsum("bchgk,bchkd->bchgd", p, vc))
        outs.append(o.flatten(2, 3))
        lses.append(lse.flatten(2, 3))
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, HQ, Dv, dtype=torch.float32)
    if return_lse:
        lse = torch.cat(lses, 1) if lses else q.new_zeros(B, 0, HQ, dtype=torch.float32)
        return o.to(q.dtype), lse
    return o.to(q.dtype)


def _selection_dense(qc, kf, vf, ic, qlay, s, e, lo, hi, select_size, scale, k_offset, cu_seqlens):
    """Selected-block attention for one query chunk as a masked attention over keys [lo, hi)."""
    H = kf.shape[2]
    klay = token_layout(k_offset + lo, hi - lo, cu_seqlens, qc.device)
    kblk = klay.pos // select_size  # (K,) block id of each key in its document
    chosen = (ic[..., :, None] == kblk).any(-2)  # (B, C, H, K)
    same_doc = klay.doc[None, :] == qlay.doc[s:e, None]
    causal = klay.pos[None, :] <= qlay.pos[s:e, None]
    valid = chosen & (same_doc & causal)[None, :, None, :]
    qc = qc.unflatten(2, (H, -1))  # (B, C, H, G, D)
    kc, vc = kf[:, lo:hi], vf[:, lo:hi]
    scores = torch.einsum("bchgd,bkhd->bchgk", qc, kc) * scale
    val = valid[:, :, :, None, :].expand_as(scores)
    o, lse = _masked_softmax_attention(scores, val, lambda p: torch.einsum("bchgk,bkhd->bchgd", p, vc))
    return o.flatten(2, 3), lse.flatten(2, 3)


def window_attention(q, k, v, *, window, scale, q_offset=0, k_offset=0, cu_seqlens=None):
    B, T, HQ, D = q.shape
    _, Tk, H, Dv = v.shape
    G = HQ // H
    qf, kf, vf = _acc(q), _acc(k), _acc(v)
    qlay = token_layout(q_offset, T, cu_seqlens, q.device)
    klay = token_layout(k_offset, Tk, cu_seqlens, q.device)
    g_first = torch.maximum(qlay.doc_start, q_offset + torch.arange(T, device=q.device) - window + 1)
    if T and (int(g_first.min()) < k_offset or q_offset + T > k_offset + Tk):
        raise ValueError(f"window_attention: queries [{q_offset}, {q_offset + T}) need keys from global token "
                         f"{int(g_first.min())} on, but k covers [{k_offset}, {k_offset + Tk}); pass the preceding "
                         f"window-1 keys (the halo) and set k_offset")
    outs = []
    # a chunk of about one window keeps the key band about two windows wide
    for s, e in _query_chunks(T, HQ * (window + 1), max_step=max(64, window)):
        lo = max(0, q_offset + s - window + 1 - k_offset)
        hi = min(Tk, q_offset + e - k_offset)
        qc = qf[:, s:e].unflatten(2, (H, G))
        kc, vc = kf[:, lo:hi], vf[:, lo:hi]
        scores = torch.einsum("bchgd,bkhd->bchgk", qc, kc) * scale  # (B, C, H, G, K)
        qg = q_offset + torch.arange(s, e, device=q.device)[:, None]
        kg = k_offset + torch.arange(lo, hi, device=q.device)[None, :]
        valid = (klay.doc[lo:hi][None, :] == qlay.doc[s:e, None]) & (kg <= qg) & (kg > qg - window)
        val = valid[None, :, None, None, :].expand_as(scores)
        o, _ = _masked_softmax_attention(scores, val, lambda p: torch.einsum("bchgk,bkhd->bchgd", p, vc))
        outs.append(o.flatten(2, 3))
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, HQ, Dv, dtype=torch.float32)
    return o.to(q.dtype)
