"""Moving compressed and selected K/V between ranks, and counting the bytes.

Compressed K/V are small (`N/d` tokens), so every rank gathers all of them. Selected K/V are
fetched block by block: a rank asks each owner for the union of remote blocks its queries chose
(counts, then ids, then the blocks), and the blocks land at their global positions in a key
buffer that the selection op reads with `k_offset = 0`. Blocks are fetched on the global grid of
`select_size` tokens, which chunk edges respect, so every grid block has one owner; a selection
block of a packed document (which starts at its document's first token) touches at most two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_dist.kernels.nsa.layout import token_layout

from .collectives import all_gather_ints, all_to_all, ring_all_to_all
from .mesh import SequenceParallel
from .sharding import chunk_owner, global_positions, global_positions_of, local_index, rank_chunks

ID_BYTES = 8


@dataclass(frozen=True)
class ExchangeStats:
    """Bytes one rank sent to other ranks in one NSA layer's forward (the backward sends as many back).

    `allgather_bytes` is what the plain context-parallel baseline (an all-gather of the selection
    K/V) would have sent instead of `exchange_bytes`.
    """

    mode: str  # how the selected K/V moved: "all_to_all", "ring" or "all_gather"
    fell_back: bool  # an exchange was asked for but the all-gather was cheaper
    exchange_bytes: int  # counts + ids + selected blocks, or the all-gather when it fell back
    halo_bytes: int
    compressed_bytes: int
    allgather_bytes: int
    blocks_fetched: int  # remote selection blocks this rank received

    @property
    def total_bytes(self) -> int:
        return self.exchange_bytes + self.halo_bytes + self.compressed_bytes


def all_gather_compressed(pieces: torch.Tensor, chunk_counts: list[int], sp: SequenceParallel):
    """All compressed tokens in global order, from each rank's `pieces [B, n_r, ...]` (the tokens of its
    chunk r, then of chunk 2P-1-r; `chunk_counts[c]` tokens in chunk c). Its backward sums the
    gradient of each rank's tokens over all ranks (a reduce-scatter). Returns the tensor and the
    bytes sent."""
    P = sp.size
    per_rank = [sum(chunk_counts[c] for c in rank_chunks(s, P)) for s in range(P)]
    rows = pieces.transpose(0, 1)  # (n_r, B, ...)
    got = all_to_all(rows.repeat(P, *([1] * (rows.dim() - 1))), [per_rank[sp.rank]] * P, per_rank, sp)
    order = sp.cached(("compressed_order", tuple(chunk_counts)), lambda: _chunk_order(chunk_counts, P))
    row_bytes = rows[:1].numel() * rows.element_size()
    return got.index_select(0, order.to(got.device)).transpose(0, 1), per_rank[sp.rank] * (P - 1) * row_bytes


def _chunk_order(chunk_counts, P):
    """Rows of the received buffer (grouped by rank: its first chunk, then its second) in chunk order."""
    start, at = {}, 0
    for s in range(P):
        for c in rank_chunks(s, P):
            start[c] = at
            at += chunk_counts[c]
    return torch.cat([torch.arange(start[c], start[c] + chunk_counts[c]) for c in range(2 * P)])


def needed_grid_blocks(idx: list[torch.Tensor], chunk_starts: list[int], *, select_size: int, seq_len: int,
                       cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Which global `select_size`-token grid blocks the selected blocks touch, `[seq_len // l']` bool."""
    needed = torch.zeros(seq_len // select_size, dtype=torch.bool, device=idx[0].device)
    for ids, start in zip(idx, chunk_starts):
        T = ids.shape[1]
        lay = token_layout(start, T, cu_seqlens, ids.device)
        shape = (1, T, 1, 1)
        ids = ids.long()
        valid = ids >= 0
        first = lay.doc_start.view(shape) + ids * select_size
        g_query = torch.arange(start, start + T, device=ids.device).view(shape)
        last = torch.minimum(torch.minimum(first + select_size - 1, lay.doc_end.view(shape) - 1), g_query)
        needed[torch.div(first[valid], select_size, rounding_mode="floor")] = True
        needed[torch.div(last[valid], select_size, rounding_mode="floor")] = True
    return needed


def exchange_selected_blocks(kv: torch.Tensor, idx: list[torch.Tensor], sp: SequenceParallel, *, select_size: int,
                             cu_seqlens: torch.Tensor | None = None):
    """A key buffer `[B, hi, H, F]` holding global tokens `[0, hi)` that covers every block the rank's
    queries selected, from the local `kv [B, 2C, H, F]` and the per-chunk `idx [B, C, H, n]`.

    Positions no query selected stay zero (never read). `hi` is the end of the rank's last chunk.
    Returns `(buffer, mode, fell_back, exchange_bytes, blocks_fetched, allgather_bytes)`.
    """
    P, r = sp.size, sp.rank
    B, T2 = kv.shape[:2]
    C, N = T2 // 2, T2 * P
    hi = (2 * P - r) * C
    row_bytes = kv[:, :1].numel() * kv.element_size()
    block_bytes = select_size * row_bytes
    allgather_bytes = T2 * row_bytes * (P - 1)
    if sp.exchange == "all_gather":
        return _all_gather_kv(kv, sp)[:, :hi], "all_gather", False, allgather_bytes, 0, allgather_bytes

    starts = [c * C for c in rank_chunks(r, P)]
    needed = needed_grid_blocks(idx, starts, select_size=select_size, seq_len=N, cu_seqlens=cu_seqlens)
    blocks_per_chunk = C // select_size
    grid = torch.arange(needed.numel(), device=needed.device)
    owner = chunk_owner(torch.div(grid, blocks_per_chunk, rounding_mode="floor"), P)
    remote = grid[needed & (owner != r)]
    remote_owner = owner[remote]
    order = torch.sort(remote_owner, stable=True).indices  # grouped by owner, ascending inside
    remote, remote_owner = remote[order], remote_owner[order]
    counts = all_gather_ints(torch.bincount(remote_owner, minlength=P).tolist(), sp)  # counts[d][s]: d asks s
    counts_bytes = ID_BYTES * P * (P - 1)
    received = [sum(counts[d][s] for s in range(P) if s != d) * (block_bytes + ID_BYTES) for d in range(P)]
    if sp.fallback and P > 1 and max(received) >= allgather_bytes:
        return (_all_gather_kv(kv, sp)[:, :hi], "all_gather", True, counts_bytes + allgather_bytes, 0,
                allgather_bytes)

    asks = counts[r]
    asked = [counts[d][r] for d in range(P)]
    requested = all_to_all(remote, asks, asked, sp)  # ids of my blocks that each rank wants, by requester
    offs = torch.arange(select_size, device=kv.device)
    send_tokens = local_index((requested[:, None] * select_size + offs).flatten(), C, P)
    rows = kv.transpose(0, 1).index_select(0, send_tokens)  # (S, B, H, F)
    move = ring_all_to_all if sp.exchange == "ring" else all_to_all
    fetched = move(rows, [n * select_size for n in asked], [n * select_size for n in asks], sp).transpose(0, 1)
    positions = torch.cat([global_positions(sp, T2, kv.device), (remote[:, None] * select_size + offs).flatten()])
    buffer = kv.new_zeros((B, hi, *kv.shape[2:])).index_copy(1, positions, torch.cat([kv, fetched], 1))
    sent = counts_bytes + ID_BYTES * sum(asks[s] for s in range(P) if s != r) + block_bytes * sum(
        asked[d] for d in range(P) if d != r)
    return buffer, sp.exchange, False, sent, int(remote.numel()), allgather_bytes


def _all_gather_kv(kv: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Every rank's K/V in global order, `[B, N, H, F]`; the backward returns each rank its gradient."""
    P, T2 = sp.size, kv.shape[1]
    rows = kv.transpose(0, 1)  # (2C, B, H, F)
    got = all_to_all(rows.repeat(P, *([1] * (rows.dim() - 1))), [T2] * P, [T2] * P, sp)  # grouped by rank
    where = sp.cached(("all_gather_order", T2), lambda: torch.sort(
        torch.cat([global_positions_of(s, P, T2) for s in range(P)])).indices)
    return got.index_select(0, where.to(kv.device)).transpose(0, 1)
