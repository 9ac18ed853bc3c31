"""Halo exchange: each local chunk gets the keys/values just before it, from whichever ranks own them.

The sliding window needs the `w-1` keys before a chunk and a compression block ending inside the
chunk starts up to `l-d` keys before it (`l-1` with packed documents, whose blocks are not aligned
to the stride). With zigzag chunks shorter than that, the halo spans several preceding chunks
on several ranks, so it is fetched as a static plan of token ranges: every rank computes the
same plan from `sp` alone, and one `all_to_all_single` moves it (the gradient returns the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import all_to_all
from .mesh import SequenceParallel
from .state import UNTIMED, PlanCache
from .sharding import chunk_owner, local_index, rank_chunks


@dataclass(frozen=True)
class TokenFetchPlan:
    """Rows to move so that each rank receives the global tokens it asked for, in its order."""

    send_index: torch.Tensor  # local rows to send, grouped by destination rank
    send_splits: list
    recv_splits: list
    restore: torch.Tensor  # for each requested token, its row in the received buffer
    rows_sent_remote: int  # rows sent to other ranks (what the byte count sees)


def token_fetch_plan(requests: list[torch.Tensor], rank: int, size: int, chunk_len: int) -> TokenFetchPlan:
    """`requests[d]`: the global token ids rank `d` wants (the same list on every rank)."""
    send_index, send_splits = [], []
    for want in requests:
        from_me = want[chunk_owner(torch.div(want, chunk_len, rounding_mode="floor"), size) == rank]
        send_index.append(local_index(from_me, chunk_len, size))
        send_splits.append(from_me.numel())
    mine = requests[rank]
    owner = chunk_owner(torch.div(mine, chunk_len, rounding_mode="floor"), size)
    order = torch.sort(owner, stable=True).indices  # received rows come grouped by source rank
    recv_splits = torch.bincount(owner, minlength=size).tolist()
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel())
    return TokenFetchPlan(send_index=torch.cat(send_index), send_splits=send_splits, recv_splits=recv_splits,
                          restore=restore, rows_sent_remote=sum(send_splits) - send_splits[rank])


def fetch_tokens(x: torch.Tensor, plan: TokenFetchPlan, sp: SequenceParallel, timer=UNTIMED) -> torch.Tensor:
    """`x [B, 2C, ...]` local → `[B, R, ...]` the requested tokens, differentiable; the plan's index
    tensors on `x`'s device."""
    rows = x.transpose(0, 1).index_select(0, plan.send_index)  # (S, B, ...)
    got = all_to_all(rows, plan.send_splits, plan.recv_splits, sp, timer)  # (R, B, ...), grouped by source
    return got.index_select(0, plan.restore).transpose(0, 1)


def halo_starts(rank: int, size: int, chunk_len: int, halo_len: int) -> list[int]:
    """Global index of the first halo token of each of the rank's two chunks."""
    return [max(0, c * chunk_len - halo_len) for c in rank_chunks(rank, size)]


def halo_plan(sp: SequenceParallel, chunk_len: int, halo_len: int, device=None, *,
              plans: PlanCache | None = None) -> TokenFetchPlan:
    def build():
        requests = []
        for d in range(sp.size):
            starts = halo_starts(d, sp.size, chunk_len, halo_len)
            requests.append(torch.cat([torch.arange(s, c * chunk_len)
                                       for s, c in zip(starts, rank_chunks(d, sp.size))]))
        return token_fetch_plan(requests, sp.rank, sp.size, chunk_len)

    return (plans or PlanCache()).get(("halo", sp.rank, sp.size, chunk_len, halo_len), build, device)


def exchange_halo(x: torch.Tensor, sp: SequenceParallel, halo_len: int, *, plans: PlanCache | None = None,
                  timer=UNTIMED):
    """Each local chunk with its halo in front: `[(x_ext [B, h_j + C, ...], first global index)]` for
    the rank's two chunks, and the bytes sent to other ranks. The transfer (and its backward) runs
    inside `timer`."""
    chunk_len = x.shape[1] // 2
    plan = halo_plan(sp, chunk_len, halo_len, x.device, plans=plans)
    halo = fetch_tokens(x, plan, sp, timer)
    starts = halo_starts(sp.rank, sp.size, chunk_len, halo_len)
    out, at = [], 0
    for j, (s, c) in enumerate(zip(starts, rank_chunks(sp.rank, sp.size))):
        h = c * chunk_len - s
        out.append((torch.cat([halo[:, at:at + h], x[:, j * chunk_len:(j + 1) * chunk_len]], 1), s))
        at += h
    row_bytes = x[:, :1].numel() * x.element_size()
    return out, plan.rows_sent_remote * row_bytes
