"""The NSA forward of one rank's zigzag shard, equal to the single-rank forward on the full sequence.

Per layer: halo of K/V before each local chunk → compressed tokens whose block ends in a local
chunk (their earlier keys come from the halo) → all-gather of compressed K/V → per chunk:
compressed attention and top-n on global block ids → exchange of the selected remote blocks →
selected and sliding-window attention. The math stays in the ops of nsa_dist.kernels; each call
says where its chunk sits (`q_offset`, `k_offset`, global `seq_len` and `cu_seqlens`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from nsa_dist.kernels import (compressed_attention, gated_sum, select_blocks, selection_attention,
                              window_attention)
from nsa_dist.kernels.nsa.reference import sort_block_ids

from .collectives import all_gather_ints
from .exchange import (ExchangeStats, all_gather_compressed, exchange_selected_blocks, grid_owner,
                       place_rows, plan_selected_blocks, ring_steps, selected_grid_extent)
from .halo import exchange_halo
from .mesh import SequenceParallel
from .sharding import check_length, rank_chunks


@dataclass(frozen=True)
class CompressedPlan:
    """Which compressed tokens each chunk computes: those whose block's last key lies in the chunk."""

    chunk_counts: list  # compressed tokens per chunk, all 2P chunks
    starts: list  # for the rank's two chunks: global index of each of its tokens' first key


def compressed_plan(seq_len: int, chunk_len: int, block_len: int, stride: int, cu: tuple | None,
                    sp: SequenceParallel) -> CompressedPlan:
    if cu is None:
        docs = [(0, seq_len)]
    else:
        docs = list(zip(cu[:-1], cu[1:]))
    starts = torch.cat([a + torch.arange(max(0, (b - a - block_len) // stride + 1)) * stride for a, b in docs])
    last = starts + block_len - 1  # ascending: compressed tokens are packed in order of their blocks
    edges = torch.searchsorted(last, torch.arange(2 * sp.size + 1) * chunk_len).tolist()
    counts = [edges[c + 1] - edges[c] for c in range(2 * sp.size)]
    mine = [starts[edges[c]:edges[c + 1]] for c in rank_chunks(sp.rank, sp.size)]
    return CompressedPlan(chunk_counts=counts, starts=mine)


def _check_inputs(sp: SequenceParallel, local_len: int, config, cu_seqlens):
    """Validate the shard; with `sp.check_inputs`, check that every rank of the group agrees on the
    shapes and the config (a mismatch would otherwise hang or silently mix sequences)."""
    if local_len % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length must be even, got {local_len}; "
                         "build the input with nsa_dist.parallel.shard")
    seq_len = local_len * sp.size
    check_length(seq_len, sp.size, multiple=config.select_size,
                 what=f"the global sequence (P = {sp.size} x local length {local_len})")
    cu = None if cu_seqlens is None else tuple(cu_seqlens.tolist())  # host sync: the plans depend on the boundaries
    knobs = (config.block_len, config.stride, config.select_size, config.top_n, config.window, config.num_init,
             config.num_local, config.compression, config.separate_kv)
    if sp.check_inputs:
        fingerprint = [local_len, zlib.crc32(repr((knobs, cu)).encode())]
        views = all_gather_ints(fingerprint, sp)
        if any(v != fingerprint for v in views):
            lengths = [v[0] for v in views]
            what = (f"local lengths {lengths}" if len(set(lengths)) > 1
                    else f"NSA configs or cu_seqlens differ (fingerprints {[v[1] for v in views]})")
            raise ValueError(f"ranks of the sequence-parallel group disagree: {what}; every rank must pass its "
                             "shard of the same sequence (nsa_dist.parallel.shard), the same global cu_seqlens "
                             "and the same layer config")
    return seq_len, cu


def sequence_parallel_nsa(q, kv_sets, gates, *, compress_k, compress_v, config, sp: SequenceParallel,
                          cu_seqlens: torch.Tensor | None = None):
    """`o [B, 2C, HQ, Dv]` for the rank's shard.

    q `[B, 2C, HQ, D]`; `kv_sets` one `(k, v)` shared by all branches or three (compression,
    selection, window), each `[B, 2C, H, D]`; `gates` `(g_cmp, g_slc[, g_win])` `[B, 2C, HQ]`;
    `compress_k/v` map key/value blocks `[B, n, l, H, D]` to compressed tokens `[B, n, H, D]`;
    `config` an NSAConfig; `cu_seqlens` global. Records one ExchangeStats in `sp.stats`.
    """
    c = config
    B, T2, HQ, D = q.shape
    P, C = sp.size, T2 // 2
    seq_len, cu = _check_inputs(sp, T2, c, cu_seqlens)
    (k_cmp_src, v_cmp_src), (k_slc, v_slc), (k_win, v_win) = (list(kv_sets) * 3)[:3] if len(kv_sets) == 1 else kv_sets
    chunk_starts = [ch * C for ch in rank_chunks(sp.rank, P)]
    pos = dict(scale=None, cu_seqlens=cu_seqlens, seq_len=seq_len, backend=c.backend)

    # Packed documents start anywhere, so a compression block ending in a chunk may start l-1 keys before it.
    cmp_halo = c.block_len - 1 if cu is not None else c.block_len - c.stride
    halo_len = max(cmp_halo, c.window - 1 if c.window else 0)
    shared = k_win is k_cmp_src
    halo_src = [k_cmp_src, v_cmp_src] + ([] if shared or not c.window else [k_win, v_win])
    widths = [t.shape[-1] for t in halo_src]
    extended, halo_bytes = exchange_halo(torch.cat(halo_src, -1), sp, halo_len)
    extended = [(x.split(widths, -1), lo) for x, lo in extended]

    plan = sp.cached(("compressed", seq_len, c.block_len, c.stride, cu),
                     lambda: compressed_plan(seq_len, C, c.block_len, c.stride, cu, sp), q.device)
    offs = torch.arange(c.block_len, device=q.device)
    k_blocks, v_blocks = [], []
    for (parts, lo), starts in zip(extended, plan.starts):
        gather = (starts - lo)[:, None] + offs  # (n, l) rows of the extended chunk
        k_blocks.append(parts[0][:, gather])  # (B, n, l, H, D)
        v_blocks.append(parts[1][:, gather])
    k_cmp_local, v_cmp_local = compress_k(torch.cat(k_blocks, 1)), compress_v(torch.cat(v_blocks, 1))
    cmp_all, cmp_bytes = all_gather_compressed(torch.cat([k_cmp_local, v_cmp_local], -1), plan.chunk_counts, sp)
    k_cmp, v_cmp = cmp_all.split([k_cmp_local.shape[-1], v_cmp_local.shape[-1]], -1)

    q_chunks = q.split(C, 1)
    o_cmp, idx = [], []
    for qj, start in zip(q_chunks, chunk_starts):
        o, lse = compressed_attention(qj, k_cmp, v_cmp, block_len=c.block_len, stride=c.stride, q_offset=start, **pos)
        o_cmp.append(o)
        idx.append(select_blocks(qj, k_cmp, lse, block_len=c.block_len, stride=c.stride, select_size=c.select_size,
                                 top_n=c.top_n, num_init=c.num_init, num_local=c.num_local, q_offset=start, **pos))

    kv_slc = torch.cat([k_slc, v_slc], -1)
    slc_widths = [k_slc.shape[-1], v_slc.shape[-1]]
    xplan = None
    if sp.exchange != "all_gather":
        xplan = plan_selected_blocks(kv_slc, idx, sp, select_size=c.select_size, cu_seqlens=cu_seqlens)
    if xplan is not None and sp.exchange == "ring" and not xplan.fall_back:
        o_slc = ring_selection_attention(q_chunks, idx, chunk_starts, kv_slc, xplan, sp, slc_widths, config, pos)
    else:
        (k_buf, v_buf), xplan = exchange_selected_blocks(kv_slc, idx, sp, select_size=c.select_size,
                                                         widths=slc_widths, cu_seqlens=cu_seqlens, plan=xplan)
        o_slc = [selection_attention(qj, k_buf, v_buf, ids, select_size=c.select_size, q_offset=start, k_offset=0,
                                     **pos) for qj, ids, start in zip(q_chunks, idx, chunk_starts)]
    gathered = xplan.fall_back or sp.exchange == "all_gather"

    outs = []
    for j, (qj, start) in enumerate(zip(q_chunks, chunk_starts)):
        rows = slice(j * C, (j + 1) * C)
        branches = [o_cmp[j], o_slc[j]]
        if c.window:
            parts, lo = extended[j]
            k_w, v_w = (parts[0], parts[1]) if shared else (parts[2], parts[3])
            branches.append(window_attention(qj, k_w, v_w, window=c.window, q_offset=start, k_offset=lo, **pos))
        outs.append(gated_sum(branches, [g[:, rows] for g in gates[:len(branches)]], backend=c.backend))
    sp.stats.append(ExchangeStats(mode="all_gather" if gathered else sp.exchange, fell_back=xplan.fall_back,
                                  exchange_bytes=xplan.exchange_bytes, halo_bytes=halo_bytes,
                                  compressed_bytes=cmp_bytes, allgather_bytes=xplan.allgather_bytes,
                                  blocks_fetched=0 if gathered else int(xplan.remote.numel())))
    return torch.cat(outs, 1)


def ring_selection_attention(q_chunks, idx, chunk_starts, kv, plan, sp: SequenceParallel, widths, config, pos):
    """Selected attention while the ring brings the blocks: at step `s` each query attends to the
    selected blocks whose keys have all arrived by then (those of ranks `r`, `r-1`, .., `r-s`) while
    step `s+1` is in flight; the partial results merge by their log-sum-exps, exactly."""
    c = config
    P, r = sp.size, sp.rank
    T2 = kv.shape[1]
    blocks_per_chunk = T2 // 2 // c.select_size
    ready = []  # the ring step after which every key of a selected block is here
    for ids, start in zip(idx, chunk_starts):
        first, last, valid = selected_grid_extent(ids, start, select_size=c.select_size, cu_seqlens=pos["cu_seqlens"])
        arrival = lambda g: (r - grid_owner(g, blocks_per_chunk, P)) % P  # noqa: E731
        ready.append(torch.where(valid, torch.maximum(arrival(first), arrival(last)), -1))
    buffers = None
    partial = [[] for _ in q_chunks]
    for step, positions, rows in ring_steps(kv, plan, sp, select_size=c.select_size):
        buffers = place_rows(rows, positions, (2 * P - r) * (T2 // 2), widths, into=buffers)
        k_buf, v_buf = buffers
        for j, (qj, ids, start) in enumerate(zip(q_chunks, idx, chunk_starts)):
            now = sort_block_ids(torch.where(ready[j] == step, ids, torch.full_like(ids, -1)))
            partial[j].append(selection_attention(qj, k_buf, v_buf, now, select_size=c.select_size, q_offset=start,
                                                  k_offset=0, return_lse=True, **pos))
    return [merge_partial_attention(p) for p in partial]


def merge_partial_attention(parts):
    """Softmax attention over the union of disjoint key sets from each set's `(o, lse)`."""
    o = torch.stack([p[0].float() for p in parts])  # (S, B, T, HQ, Dv)
    lse = torch.stack([p[1].float() for p in parts])  # (S, B, T, HQ)
    m = lse.max(0).values.detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # a set with no key (lse = -inf) weighs 0
    w = w / w.sum(0).clamp_min(torch.finfo(w.dtype).tiny)
    return (w.unsqueeze(-1) * o).sum(0).to(parts[0][0].dtype)
