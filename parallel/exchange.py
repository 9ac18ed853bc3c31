"""Moving compressed and selected K/V between ranks, and counting the bytes.

Compressed K/V are small (`N/d` tokens), so every rank gathers all of them. Selected K/V are
fetched block by block: a rank asks each owner for the union of remote blocks its queries chose
(counts, then ids, then the blocks), and the blocks land at their global positions in a key
buffer that the selection op reads with `k_offset = 0`. Blocks are fetched on the global grid of
`select_size` tokens, which chunk edges respect, so every grid block has one owner; a selection
block of a packed document (which starts at its document's first token) touches at most two.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nsa_dist.kernels import token_layout

from .collectives import all_gather_ints, all_to_all, ring_all_to_all
from .mesh import SequenceParallel
from .sharding import chunk_owner, global_positions, global_positions_of, local_index, rank_chunks
from .state import UNTIMED, ExchangeLog, PlanCache

ID_BYTES = 8
# What `ExchangeStats.seconds` is keyed by: the halo, the compressed all-gather, and the selected K/V's
# movement (counts and ids, then the blocks by all-to-all or ring steps, or the all-gather fallback).
COLLECTIVES = ("halo", "compressed_allgather", "exchange")


@dataclass(frozen=True)
class ExchangeStats:
    """Bytes one rank sent to other ranks in one NSA layer's forward (the backward sends as many back).

    `allgather_bytes` is what the plain context-parallel baseline (an all-gather of the selection
    K/V) would have sent instead of `exchange_bytes`. `seconds` holds the wall time of each of
    `COLLECTIVES` that ran, forward plus backward, when the `ExchangeLog` is timed (empty when not);
    the backward adds its share after the layer call returns, so read it after the backward.
    """

    mode: str  # how the selected K/V moved: "all_to_all", "ring" or "all_gather"
    fell_back: bool  # an exchange was asked for but the all-gather was cheaper
    exchange_bytes: int  # counts + ids + selected blocks, or the all-gather when it fell back
    halo_bytes: int
    compressed_bytes: int
    allgather_bytes: int
    blocks_fetched: int  # remote selection blocks this rank received
    seconds: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def total_bytes(self) -> int:
        return self.exchange_bytes + self.halo_bytes + self.compressed_bytes


def all_gather_compressed(pieces: torch.Tensor, chunk_counts: list[int], sp: SequenceParallel, *,
                          plans: PlanCache | None = None, timer=UNTIMED):
    """All compressed tokens in global order, from each rank's `pieces [B, n_r, ...]` (the tokens of its
    chunk r, then of chunk 2P-1-r; `chunk_counts[c]` tokens in chunk c). Its backward sums the
    gradient of each rank's tokens over all ranks (a reduce-scatter). Returns the tensor and the
    bytes sent. The transfer (and its backward) runs inside `timer`."""
    P = sp.size
    per_rank = [sum(chunk_counts[c] for c in rank_chunks(s, P)) for s in range(P)]
    rows = pieces.transpose(0, 1)  # (n_r, B, ...)
    got = all_to_all(rows.repeat(P, *([1] * (rows.dim() - 1))), [per_rank[sp.rank]] * P, per_rank, sp, timer)
    order = (plans or PlanCache()).get(("compressed_order", P, tuple(chunk_counts)),
                                       lambda: _chunk_order(chunk_counts, P), rows.device)
    row_bytes = rows[:1].numel() * rows.element_size()
    return got.index_select(0, order).transpose(0, 1), per_rank[sp.rank] * (P - 1) * row_bytes


def _chunk_order(chunk_counts, P):
    """Rows of the received buffer (grouped by rank: its first chunk, then its second) in chunk order."""
    start, at = {}, 0
    for s in range(P):
        for c in rank_chunks(s, P):
            start[c] = at
            at += chunk_counts[c]
    return torch.cat([torch.arange(start[c], start[c] + chunk_counts[c]) for c in range(2 * P)])


def selected_grid_extent(ids: torch.Tensor, chunk_start: int, *, select_size: int,
                         cu_seqlens: torch.Tensor | None):
    """The first and last global grid block each selected block of a chunk's queries reads, and which
    entries are selections (not -1). `ids [B, C, H, n]` → three tensors of that shape."""
    T = ids.shape[1]
    lay = token_layout(chunk_start, T, cu_seqlens, ids.device)
    shape = (1, T, 1, 1)
    ids = ids.long()
    first = lay.doc_start.view(shape) + ids.clamp_min(0) * select_size
    g_query = torch.arange(chunk_start, chunk_start + T, device=ids.device).view(shape)
    last = torch.minimum(torch.minimum(first + select_size - 1, lay.doc_end.view(shape) - 1), g_query)
    div = lambda g: torch.div(g, select_size, rounding_mode="floor")  # noqa: E731
    return div(first), div(last), ids >= 0


@dataclass(frozen=True)
class SelectedBlocksPlan:
    """Who sends which selection-grid blocks to whom in one layer call (from the counts all-gather)."""

    remote: torch.Tensor  # grid blocks this rank fetches, grouped by owner, ascending inside
    counts: list  # counts[d][s]: blocks rank d fetches from rank s
    fall_back: bool  # the all-gather moves no more bytes than the busiest rank would receive
    exchange_bytes: int  # what this rank sends: counts, ids and blocks (or counts and the all-gather)
    allgather_bytes: int  # what this rank would send in the plain all-gather


def plan_selected_blocks(kv: torch.Tensor, idx: list[torch.Tensor], sp: SequenceParallel, *, select_size: int,
                         cu_seqlens: torch.Tensor | None = None, timer=UNTIMED) -> SelectedBlocksPlan:
    """Counts of the remote grid blocks every rank needs (one all-gather) and the fallback decision."""
    P, r = sp.size, sp.rank
    T2 = kv.shape[1]
    C = T2 // 2
    row_bytes = kv[:, :1].numel() * kv.element_size()
    block_bytes = select_size * row_bytes
    allgather_bytes = all_gather_bytes(T2, row_bytes, P)
    num_grid = T2 * P // select_size
    needed = torch.zeros(num_grid + 1, dtype=torch.bool, device=kv.device)  # the last slot takes the -1 entries
    for ids, chunk in zip(idx, rank_chunks(r, P)):
        first, last, valid = selected_grid_extent(ids, chunk * C, select_size=select_size, cu_seqlens=cu_seqlens)
        # a selection block covers its first and last grid block, nothing between; no boolean indexing
        # here, which would sync with the host
        needed[torch.where(valid, first, num_grid).flatten()] = True
        needed[torch.where(valid, last, num_grid).flatten()] = True
    grid = torch.arange(num_grid, device=kv.device)
    owner = grid_owner(grid, C // select_size, P)
    remote = grid[needed[:num_grid] & (owner != r)]  # host sync: the number of remote blocks sizes the exchange
    remote_owner = owner[remote]
    order = torch.sort(remote_owner, stable=True).indices
    remote, remote_owner = remote[order], remote_owner[order]
    per_owner = torch.zeros(P, dtype=torch.int64, device=kv.device).index_add_(  # bincount would sync on CUDA
        0, remote_owner, torch.ones_like(remote_owner))
    counts = all_gather_ints(per_owner, sp, timer)  # host sync: splits are ints
    counts_bytes = ID_BYTES * P * (P - 1)
    received = [sum(counts[d][s] for s in range(P) if s != d) * (block_bytes + ID_BYTES) for d in range(P)]
    if sp.fallback and P > 1 and max(received) >= allgather_bytes:
        return SelectedBlocksPlan(remote=remote, counts=counts, fall_back=True,
                                  exchange_bytes=counts_bytes + allgather_bytes, allgather_bytes=allgather_bytes)
    sent = counts_bytes + ID_BYTES * sum(counts[r][s] for s in range(P) if s != r) + block_bytes * sum(
        counts[d][r] for d in range(P) if d != r)
    return SelectedBlocksPlan(remote=remote, counts=counts, fall_back=False, exchange_bytes=sent,
                              allgather_bytes=allgather_bytes)


def grid_owner(grid: torch.Tensor, blocks_per_chunk: int, size: int) -> torch.Tensor:
    return chunk_owner(torch.div(grid, blocks_per_chunk, rounding_mode="floor"), size)


def _requested_rows(kv: torch.Tensor, plan: SelectedBlocksPlan, sp: SequenceParallel, select_size: int,
                    timer=UNTIMED):
    """Tell each owner which of its blocks this rank wants (ids), and gather the rows the others asked
    for: `(rows [S, B, H, F] grouped by requester, rows per requester, rows per owner)`."""
    P, r = sp.size, sp.rank
    asks = plan.counts[r]
    asked = [plan.counts[d][r] for d in range(P)]
    requested = all_to_all(plan.remote, asks, asked, sp, timer)  # ids of my blocks, grouped by requester
    offs = torch.arange(select_size, device=kv.device)
    send_tokens = local_index((requested[:, None] * select_size + offs).flatten(), kv.shape[1] // 2, P)
    rows = kv.transpose(0, 1).index_select(0, send_tokens)  # (S, B, H, F)
    return rows, [n * select_size for n in asked], [n * select_size for n in asks]


def exchange_selected_blocks(kv: torch.Tensor, idx: list[torch.Tensor], sp: SequenceParallel, *, select_size: int,
                             widths: list[int], cu_seqlens: torch.Tensor | None = None,
                             plan: SelectedBlocksPlan | None = None, plans: PlanCache | None = None,
                             timer=UNTIMED):
    """Key buffers holding global tokens `[0, hi)` that cover every block the rank's queries selected,
    from the local `kv [B, 2C, H, F]` (K and V side by side, `widths` of each) and the per-chunk
    `idx [B, C, H, n]`: one contiguous `[B, hi, H, width]` tensor per part, so kernels need no copy.

    Positions no query selected stay zero (never read); `hi` is the end of the rank's last chunk.
    The blocks move by `sp.exchange` (the ring here moves them all before returning; the layer's
    ring path instead attends to each step's blocks while the next step is in flight) or, when
    `plan.fall_back`, by an all-gather; every transfer (and its backward) runs inside `timer`.
    Returns `(buffers, plan)`.
    """
    P, r = sp.size, sp.rank
    T2 = kv.shape[1]
    hi = (2 * P - r) * (T2 // 2)
    if sp.exchange == "all_gather":
        ag = all_gather_bytes(T2, kv[:, :1].numel() * kv.element_size(), P)
        plan = SelectedBlocksPlan(remote=kv.new_zeros(0, dtype=torch.int64), counts=[], fall_back=False,
                                  exchange_bytes=ag, allgather_bytes=ag)
    else:
        plan = plan or plan_selected_blocks(kv, idx, sp, select_size=select_size, cu_seqlens=cu_seqlens, timer=timer)
    if plan.fall_back or sp.exchange == "all_gather":
        return [part.contiguous() for part in all_gather_kv(kv, sp, plans, timer)[:, :hi].split(widths, -1)], plan
    rows, send_splits, recv_splits = _requested_rows(kv, plan, sp, select_size, timer)
    move = ring_all_to_all if sp.exchange == "ring" else all_to_all
    fetched = move(rows, send_splits, recv_splits, sp, timer).transpose(0, 1)  # (B, R, H, F)
    offs = torch.arange(select_size, device=kv.device)
    positions = torch.cat([global_positions(sp, T2, kv.device, plans=plans), (plan.remote[:, None] * select_size + offs).flatten()])
    return place_rows(torch.cat([kv, fetched], 1), positions, hi, widths), plan


def place_rows(rows: torch.Tensor, positions: torch.Tensor, length: int, widths: list[int], into=None):
    """`rows [B, R, H, F]` at token `positions` of zero (or `into`) buffers `[B, length, H, width]`, one
    per part of F; out of place, so buffers that earlier attention saved stay intact."""
    parts = rows.split(widths, -1)
    if into is None:
        into = [rows.new_zeros((rows.shape[0], length, rows.shape[2], w)) for w in widths]
    return [buf.index_copy(1, positions, part) for buf, part in zip(into, parts)]


def ring_steps(kv: torch.Tensor, plan: SelectedBlocksPlan, sp: SequenceParallel, *, select_size: int,
               plans: PlanCache | None = None, timer=UNTIMED):
    """The selected blocks step by step: yields `(step, positions, rows [B, R_s, H, F])`, step 0 the
    local chunks, step `s` the blocks of rank `r-s`. Step `s+1` is posted before step `s` is
    yielded, so whatever the caller computes on step `s` overlaps the next transfer. `timer` times
    the ids, each step's posting and each wait, forward and backward: the transfer time the
    attention did not hide (a timed GPU run syncs around them, so nothing is hidden there)."""
    P, r = sp.size, sp.rank
    T2 = kv.shape[1]
    rows, send_splits, recv_splits = _requested_rows(kv, plan, sp, select_size, timer)
    sends = rows.split(send_splits)
    offs = torch.arange(select_size, device=kv.device)
    remote_by_owner = plan.remote.split([n // select_size for n in recv_splits])
    posted = {}

    def post(s):
        if s < P:
            posted[s] = ring_step(sends[(r + s) % P], recv_splits[(r - s) % P], (r + s) % P, (r - s) % P, sp,
                                  timer)

    post(1)
    yield 0, global_positions(sp, T2, kv.device, plans=plans), kv
    for s in range(1, P):
        post(s + 1)
        got = finish_ring_step(*posted.pop(s))
        src = (r - s) % P
        yield s, (remote_by_owner[src][:, None] * select_size + offs).flatten(), got.transpose(0, 1)


def ring_step(x: torch.Tensor, recv_rows: int, dst: int, src: int, sp: SequenceParallel, timer=UNTIMED):
    """Post one ring step: send `x` to `dst`, receive `recv_rows` rows from `src`. Returns the receive
    buffer, to be read only through `finish_ring_step`, and the step's link.

    The backward is the reverse step, split over three autograd nodes so that it overlaps too: the
    node made by `finish_ring_step` (created after the attention that overlapped the forward
    transfer, so the backward reaches it before that attention's backward) posts the reverse
    transfer; the step's own node hands on the gradient being received; an identity node in front
    waits for it where the gradient of `x` is finally needed.
    """
    link = {"meta": (x.shape[0], dst, src, sp), "timer": timer}
    return _RingStep.apply(_AwaitReverseStep.apply(x, link), recv_rows, link), link


def finish_ring_step(got: torch.Tensor, link: dict) -> torch.Tensor:
    """Wait for a step's rows to arrive; the result carries the gradient back by the reverse step."""
    with link["timer"]:
        for req in link.pop("forward"):
            req.wait()
    return _PostReverseStep.apply(got, link)


class _RingStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_rows, link):
        ctx.link = link
        _, dst, src, sp = link["meta"]
        with link["timer"]:
            got, link["forward"] = _post_send_recv(x.contiguous(), recv_rows, dst, src, sp)
        return got

    @staticmethod
    def backward(ctx, grad):
        return ctx.link["reverse"][2], None, None  # filled once _AwaitReverseStep has waited


class _LinkedIdentity(torch.autograd.Function):
    """The identity, holding a ring step's link: each subclass's backward does one part of the reverse step."""

    @staticmethod
    def forward(ctx, x, link):
        ctx.link = link
        return x.view_as(x)


class _PostReverseStep(_LinkedIdentity):
    @staticmethod
    def backward(ctx, grad):
        send_rows, dst, src, sp = ctx.link["meta"]
        grad = grad.contiguous()
        with ctx.link["timer"]:
            dx, reqs = _post_send_recv(grad, send_rows, src, dst, sp)
        ctx.link["reverse"] = (reqs, grad, dx)  # the sent gradient must live until the wait
        return grad, None


class _AwaitReverseStep(_LinkedIdentity):
    @staticmethod
    def backward(ctx, grad):
        reqs, _, _ = ctx.link.pop("reverse")
        with ctx.link["timer"]:
            for req in reqs:
                req.wait()
        return grad, None


def _post_send_recv(x, recv_rows, dst, src, sp):
    got = x.new_empty((recv_rows, *x.shape[1:]))
    ops = []
    if x.shape[0]:
        ops.append(dist.P2POp(dist.isend, x, sp.global_rank(dst), sp.group))
    if recv_rows:
        ops.append(dist.P2POp(dist.irecv, got, sp.global_rank(src), sp.group))
    return got, (dist.batch_isend_irecv(ops) if ops else [])


def all_gather_bytes(local_len: int, row_bytes: int, size: int) -> int:
    """What each rank sends (and receives) when every rank gathers all K/V: its `local_len` rows of
    `row_bytes` to each of the `size - 1` others. The baseline every exchange is measured against."""
    return local_len * row_bytes * (size - 1)


def gather_sequence_kv(k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel, plans: PlanCache | None = None,
                       exchange_log: ExchangeLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain context-parallel scheme (dense attention's): every rank's `k`, `v` `[B, 2C, H, D]` gathered
    into the whole sequence's `[B, N, H, D]`, in global order; the bytes go into `exchange_log` as an
    all-gather. Differentiable: each rank's gradients return to the tokens' owners and are summed there."""
    kv = torch.cat([k, v], -1)  # (B, 2C, H, Dk + Dv)
    full = all_gather_kv(kv, sp, plans)
    if exchange_log is not None:
        sent = all_gather_bytes(kv.shape[1], kv[:, :1].numel() * kv.element_size(), sp.size)
        exchange_log.record(ExchangeStats(mode="all_gather", fell_back=False, exchange_bytes=sent, halo_bytes=0,
                                          compressed_bytes=0, allgather_bytes=sent, blocks_fetched=0))
    k_full, v_full = full.split([k.shape[-1], v.shape[-1]], -1)
    return k_full, v_full


def all_gather_kv(kv: torch.Tensor, sp: SequenceParallel, plans: PlanCache | None, timer=UNTIMED) -> torch.Tensor:
    """Every rank's K/V in global order, `[B, N, H, F]`. Each rank may use the result differently (its
    own queries): the backward sends each rank's gradient of every token to the token's owner, which
    sums them."""
    P, T2 = sp.size, kv.shape[1]
    rows = kv.transpose(0, 1)  # (2C, B, H, F)
    got = all_to_all(rows.repeat(P, *([1] * (rows.dim() - 1))), [T2] * P, [T2] * P, sp, timer)  # grouped by rank
    where = (plans or PlanCache()).get(("all_gather_order", P, T2), lambda: torch.sort(
        torch.cat([global_positions_of(s, P, T2) for s in range(P)])).indices, kv.device)
    return got.index_select(0, where).transpose(0, 1)
