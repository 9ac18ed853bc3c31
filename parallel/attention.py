"""The NSA op sequence of one rank: the same Python sequence for the whole sequence (`sp=None`) and for a
zigzag shard of it (P = 1 is the degenerate shard: one chunk, no halo, nothing to gather or fetch).

    K/V halo before each local chunk ─ φ over the blocks that end in a local chunk ─ all-gather of the
    compressed K/V ─ per chunk: compressed attention, top-n on global block ids ─ exchange of the
    selected remote blocks ─ selected and sliding-window attention ─ gated sum

The halo, the compressed all-gather and the selected-block exchange are the three collectives; each is
the identity without `sp`. The math stays in the ops of nsa_dist.kernels; each call says where its
chunk sits (`q_offset`, `k_offset` and the global `cu_seqlens`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from nsa_dist.kernels import (compressed_attention, gated_sum, select_blocks, selection_attention, sort_block_ids,
                              window_attention)

from .collectives import all_gather_ints
from .exchange import (COLLECTIVES, ExchangeStats, all_gather_compressed, exchange_selected_blocks, grid_owner,
                       place_rows, plan_selected_blocks, ring_steps, selected_grid_extent)
from .halo import exchange_halo
from .mesh import SequenceParallel
from .sharding import check_length, rank_chunks
from .state import UNTIMED, ExchangeLog, PlanCache, stopwatches


@dataclass(frozen=True)
class LocalChunks:
    """Where the rank's query chunks sit in the global sequence."""

    seq_len: int  # global length
    chunk_len: int
    starts: tuple  # global index of each local chunk's first token, in local order

    @property
    def num_global_chunks(self) -> int:
        return self.seq_len // self.chunk_len


def local_chunks(local_len: int, sp: SequenceParallel | None) -> LocalChunks:
    """The whole sequence as one chunk without `sp`; the rank's two zigzag chunks with it."""
    if sp is None:
        return LocalChunks(seq_len=local_len, chunk_len=local_len, starts=(0,))
    C = local_len // 2
    return LocalChunks(seq_len=local_len * sp.size, chunk_len=C, starts=tuple(c * C for c in rank_chunks(sp.rank,
                                                                                                        sp.size)))


@dataclass(frozen=True)
class CompressedPlan:
    """Which compressed tokens each chunk computes: those whose block's last key lies in the chunk."""

    chunk_counts: list  # compressed tokens per chunk, every chunk of the global sequence
    starts: list  # for the rank's chunks: global index of each of its tokens' first key


def compressed_plan(chunks: LocalChunks, block_len: int, stride: int, cu: tuple | None) -> CompressedPlan:
    docs = [(0, chunks.seq_len)] if cu is None else list(zip(cu[:-1], cu[1:]))
    starts = torch.cat([a + torch.arange(max(0, (b - a - block_len) // stride + 1)) * stride for a, b in docs])
    last = starts + block_len - 1  # ascending: compressed tokens are packed in order of their blocks
    edges = torch.searchsorted(last, torch.arange(chunks.num_global_chunks + 1) * chunks.chunk_len).tolist()
    counts = [edges[c + 1] - edges[c] for c in range(chunks.num_global_chunks)]
    mine = [starts[edges[s // chunks.chunk_len]:edges[s // chunks.chunk_len + 1]] for s in chunks.starts]
    return CompressedPlan(chunk_counts=counts, starts=mine)


def branch_kv(k, v):
    """`(k, v)` of the compression, selection and window branches, from one shared `(k, v)` or from three
    per-branch sets (`k`, `v` each a sequence of three tensors)."""
    if isinstance(k, torch.Tensor):
        return ((k, v),) * 3
    if len(k) != 3 or len(v) != 3:
        raise ValueError(f"per-branch keys and values come as three tensors each (compression, selection, "
                         f"window), got {len(k)} keys and {len(v)} values")
    return tuple(zip(k, v))


def _config_knobs(config) -> tuple:
    return (config.block_len, config.stride, config.select_size, config.top_n, config.window, config.num_init,
            config.num_local, config.compression, config.separate_kv)


def _check_inputs(sp: SequenceParallel | None, local_len: int, config, cu_seqlens):
    """Validate the shard; with `sp.check_inputs`, check that every rank of the group agrees on the
    shapes and the config (a mismatch would otherwise hang or silently mix sequences). Returns the
    global `cu_seqlens` as a tuple, which the plans are keyed on."""
    cu = None if cu_seqlens is None else tuple(cu_seqlens.tolist())  # host sync: the plans depend on the boundaries
    if sp is None:
        return cu
    if local_len % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length must be even, got {local_len}; "
                         "build the input with nsa_dist.parallel.shard")
    check_length(local_len * sp.size, sp.size, multiple=config.select_size,
                 what=f"the global sequence (P = {sp.size} x local length {local_len})")
    if sp.check_inputs:
        fingerprint = [local_len, zlib.crc32(repr((_config_knobs(config), cu)).encode())]
        views = all_gather_ints(fingerprint, sp)
        if any(v != fingerprint for v in views):
            lengths = [v[0] for v in views]
            what = (f"local lengths {lengths}" if len(set(lengths)) > 1
                    else f"NSA configs or cu_seqlens differ (fingerprints {[v[1] for v in views]})")
            raise ValueError(f"ranks of the sequence-parallel group disagree: {what}; every rank must pass its "
                             "shard of the same sequence (nsa_dist.parallel.shard), the same global cu_seqlens "
                             "and the same layer config")
    return cu


def nsa_forward(q, k, v, gates, *, compress_k, compress_v, config, sp: SequenceParallel | None = None,
                cu_seqlens: torch.Tensor | None = None, plans: PlanCache | None = None,
                exchange_log: ExchangeLog | None = None):
    """`o [B, T, HQ, Dv]` for the rank's tokens: the whole sequence without `sp`, its zigzag shard with it.

    q `[B, T, HQ, D]`, projected and rotated; `k`, `v` `[B, T, H, D]` serve every branch, or come as
    three of each (compression, selection, window); `gates` `(g_cmp, g_slc[, g_win])` `[B, T, HQ]`,
    after their sigmoid; `compress_k/v` map key/value blocks `[B, n, l, H, D]` to compressed tokens
    `[B, n, H, D]`; `config` an NSAConfig; `cu_seqlens` global. `plans` keeps the index plans that
    depend only on shapes across calls (none kept when None). With `sp` and `exchange_log`, the call's
    byte counts are recorded into it as one ExchangeStats; with a timed log, so are the seconds of
    each collective, forward and backward.
    """
    c = config
    plans = PlanCache() if plans is None else plans
    cu = _check_inputs(sp, q.shape[1], c, cu_seqlens)
    seconds, timers = stopwatches(COLLECTIVES, q.device, timed=sp is not None and exchange_log is not None and exchange_log.timed)
    chunks = local_chunks(q.shape[1], sp)
    (k_cmp_src, v_cmp_src), (k_slc, v_slc), (k_win, v_win) = branch_kv(k, v)
    pos = dict(scale=None, cu_seqlens=cu_seqlens, backend=c.backend)

    # Packed documents start anywhere, so a compression block ending in a chunk may start l-1 keys before it.
    cmp_halo = c.block_len - 1 if cu is not None else c.block_len - c.stride
    halo_len = max(cmp_halo, c.window - 1 if c.window else 0)
    shared = k_win is k_cmp_src
    extended, halo_bytes = with_halo([k_cmp_src, v_cmp_src] + ([] if shared or not c.window else [k_win, v_win]),
                                     sp, halo_len, plans, timers["halo"])

    plan = plans.get(("compressed", chunks, c.block_len, c.stride, cu),
                     lambda: compressed_plan(chunks, c.block_len, c.stride, cu), q.device)
    offs = torch.arange(c.block_len, device=q.device)
    k_blocks, v_blocks = [], []
    for (parts, lo), starts in zip(extended, plan.starts):
        gather = (starts - lo)[:, None] + offs  # (n, l) rows of the extended chunk
        k_blocks.append(parts[0][:, gather])  # (B, n, l, H, D)
        v_blocks.append(parts[1][:, gather])
    k_cmp, v_cmp, cmp_bytes = gather_compressed(compress_k(_cat(k_blocks)), compress_v(_cat(v_blocks)),
                                                plan.chunk_counts, sp, plans, timers["compressed_allgather"])

    q_chunks = q.split(chunks.chunk_len, 1)
    o_cmp, idx = [], []
    for qj, start in zip(q_chunks, chunks.starts):
        o, lse = compressed_attention(qj, k_cmp, v_cmp, block_len=c.block_len, stride=c.stride, q_offset=start, **pos)
        o_cmp.append(o)
        # top-n is discrete: the ids carry no gradient; φ and the gates learn through o_cmp and the gated sum
        idx.append(select_blocks(qj, k_cmp, lse, block_len=c.block_len, stride=c.stride, select_size=c.select_size,
                                 top_n=c.top_n, num_init=c.num_init, num_local=c.num_local, q_offset=start, **pos))
    o_slc, xplan = selected_attention(q_chunks, idx, chunks, k_slc, v_slc, sp, c, pos, plans, timers["exchange"])

    outs = []
    for j, (qj, start) in enumerate(zip(q_chunks, chunks.starts)):
        rows = slice(j * chunks.chunk_len, (j + 1) * chunks.chunk_len)
        branches = [o_cmp[j], o_slc[j]]
        if c.window:
            parts, lo = extended[j]
            k_w, v_w = (parts[0], parts[1]) if shared else (parts[2], parts[3])
            branches.append(window_attention(qj, k_w, v_w, window=c.window, q_offset=start, k_offset=lo, **pos))
        outs.append(gated_sum(branches, [g[:, rows] for g in gates[:len(branches)]], backend=c.backend))
    if sp is not None and exchange_log is not None:
        gathered = xplan.fall_back or sp.exchange == "all_gather"
        exchange_log.record(ExchangeStats(mode="all_gather" if gathered else sp.exchange, fell_back=xplan.fall_back,
                                 exchange_bytes=xplan.exchange_bytes, halo_bytes=halo_bytes,
                                 compressed_bytes=cmp_bytes, allgather_bytes=xplan.allgather_bytes,
                                 blocks_fetched=0 if gathered else int(xplan.remote.numel()), seconds=seconds))
    return _cat(outs)


def _cat(chunks: list) -> torch.Tensor:
    """The local chunks back to back along time; one chunk is returned as it is (no copy)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, 1)


def with_halo(tensors: list, sp: SequenceParallel | None, halo_len: int, plans: PlanCache, timer=UNTIMED):
    """Each local chunk of `tensors` with the `halo_len` tokens before it: `[(parts, first global index)]`
    and the bytes sent. Without `sp` the one chunk is the whole sequence and has no halo."""
    if sp is None:
        return [(tensors, 0)], 0
    widths = [t.shape[-1] for t in tensors]
    extended, halo_bytes = exchange_halo(torch.cat(tensors, -1), sp, halo_len, plans=plans, timer=timer)
    return [(x.split(widths, -1), lo) for x, lo in extended], halo_bytes


def gather_compressed(k_cmp, v_cmp, chunk_counts: list, sp: SequenceParallel | None, plans: PlanCache,
                      timer=UNTIMED):
    """All compressed keys and values in global order from the rank's own, and the bytes sent; without
    `sp` the rank's own are all of them."""
    if sp is None:
        return k_cmp, v_cmp, 0
    both, nbytes = all_gather_compressed(torch.cat([k_cmp, v_cmp], -1), chunk_counts, sp, plans=plans, timer=timer)
    k_all, v_all = both.split([k_cmp.shape[-1], v_cmp.shape[-1]], -1)
    return k_all, v_all, nbytes


def selected_attention(q_chunks, idx, chunks: LocalChunks, k_slc, v_slc, sp: SequenceParallel | None, config, pos,
                       plans: PlanCache, timer=UNTIMED):
    """Selected attention of each local chunk, and the exchange plan (None without `sp`). With `sp` the
    blocks other ranks own are fetched first by `sp.exchange`, or attended step by step as the ring
    brings them."""
    c = config
    if sp is None:
        return [selection_attention(qj, k_slc, v_slc, ids, select_size=c.select_size, q_offset=start, k_offset=0,
                                    **pos) for qj, ids, start in zip(q_chunks, idx, chunks.starts)], None
    kv_slc = torch.cat([k_slc, v_slc], -1)
    widths = [k_slc.shape[-1], v_slc.shape[-1]]
    xplan = None
    if sp.exchange != "all_gather":
        xplan = plan_selected_blocks(kv_slc, idx, sp, select_size=c.select_size, cu_seqlens=pos["cu_seqlens"],
                                     timer=timer)
    if xplan is not None and sp.exchange == "ring" and not xplan.fall_back:
        return ring_selection_attention(q_chunks, idx, chunks.starts, kv_slc, xplan, sp, widths, c, pos,
                                        plans, timer), xplan
    (k_buf, v_buf), xplan = exchange_selected_blocks(kv_slc, idx, sp, select_size=c.select_size, widths=widths,
                                                     cu_seqlens=pos["cu_seqlens"], plan=xplan, plans=plans,
                                                     timer=timer)
    return [selection_attention(qj, k_buf, v_buf, ids, select_size=c.select_size, q_offset=start, k_offset=0, **pos)
            for qj, ids, start in zip(q_chunks, idx, chunks.starts)], xplan
def ring_selection_attention(q_chunks, idx, chunk_starts, kv, plan, sp: SequenceParallel, widths, config, pos,
                             plans: PlanCache | None = None, timer=UNTIMED):
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
    for step, positions, rows in ring_steps(kv, plan, sp, select_size=c.select_size, plans=plans, timer=timer):
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
