"""Zigzag sharding: the sequence splits into `2P` equal chunks and rank `r` holds chunks `r` and `2P-1-r`.

Causal attention costs more at later positions; pairing an early chunk with a late one gives
every rank the same work. A rank's local tensor is its two chunks back to back, so the global
position of every local token follows from `sp` and the local length alone.
"""
from __future__ import annotations

import functools

import torch

from .collectives import all_to_all
from .mesh import SequenceParallel
from .state import PlanCache


def rank_chunks(rank: int, size: int) -> tuple[int, int]:
    """The two chunks rank `rank` of `size` holds, in local order."""
    return rank, 2 * size - 1 - rank


def chunk_owner(chunk: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where(chunk < size, chunk, 2 * size - 1 - chunk)


def local_index(g: torch.Tensor, chunk_len: int, size: int) -> torch.Tensor:
    """Where global token `g` sits inside its owner's local tensor."""
    chunk = torch.div(g, chunk_len, rounding_mode="floor")
    return (chunk >= size).long() * chunk_len + g - chunk * chunk_len


def check_length(seq_len: int, size: int, multiple: int = 1, what: str = "the sequence"):
    """Raise unless `seq_len` splits into `2*size` chunks whose length is a multiple of `multiple`."""
    chunks = 2 * size
    if seq_len <= 0 or seq_len % chunks:
        raise ValueError(f"{what} has {seq_len} tokens, which does not split into 2P = {chunks} equal zigzag "
                         f"chunks for P = {size} ranks; pad it to a multiple of {chunks * multiple}")
    if seq_len // chunks < multiple:
        most = max(1, seq_len // (2 * multiple))
        raise ValueError(f"P = {size} ranks need 2P = {chunks} chunks of at least one selection block "
                         f"({multiple} tokens) each, but {what} has only {seq_len // multiple} such blocks; "
                         f"use at most P = {most} ranks or a sequence of at least {chunks * multiple} tokens")
    if (seq_len // chunks) % multiple:
        raise ValueError(f"{what} has {seq_len} tokens: its 2P = {chunks} zigzag chunks of {seq_len // chunks} "
                         f"tokens are not whole selection blocks of {multiple}; pad it to a multiple of "
                         f"{chunks * multiple} tokens")


def global_positions(sp: SequenceParallel | None, local_len: int, device=None, *,
                     plans: PlanCache | None = None) -> torch.Tensor:
    """Global index of each of the rank's `local_len` tokens, `[local_len]` int64 (`arange` without `sp`)."""
    device = torch.device("cpu") if device is None else device
    if sp is None:
        return torch.arange(local_len, device=device)
    if local_len % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length must be even, got {local_len}")
    return (plans or PlanCache()).get(("positions", sp.rank, sp.size, local_len),
                                      lambda: global_positions_of(sp.rank, sp.size, local_len), device)


def document_positions(sp: SequenceParallel | None, local_len: int, cu_seqlens: torch.Tensor | None = None,
                       device=None, *, plans: PlanCache | None = None) -> torch.Tensor:
    """Position of each of the rank's tokens inside its document (what RoPE rotates by), `[local_len]`:
    the global position, less its document's first token with packed documents (global `cu_seqlens`)."""
    g = global_positions(sp, local_len, device, plans=plans)
    if cu_seqlens is None:
        return g
    cu = cu_seqlens.to(device=g.device, dtype=torch.int64)
    return g - cu[(torch.searchsorted(cu, g, right=True) - 1).clamp(0, cu.numel() - 2)]


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries `[0, ..., T]` (int32) of HF-style packed `position_ids` `[1, T]` that restart
    at 0 at each document; None when they hold one document per row."""
    ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    starts = (ids == 0).sum(-1)
    if bool(starts.le(1).all()):
        return None
    if ids.shape[0] != 1:
        raise ValueError(f"position_ids restart inside a row of a batch of {ids.shape[0]}: NSA packs documents "
                         "into one row; concatenate them into a batch of 1")
    first = torch.nonzero(ids[0] == 0).flatten()
    end = torch.tensor([ids.shape[1]], device=ids.device)
    return torch.cat([first, end]).to(torch.int32)


def shard(x: torch.Tensor, sp: SequenceParallel, dim: int = 1) -> torch.Tensor:
    """The rank's zigzag shard of the full tensor `x` (the same on every rank), along `dim`.

    Plain slicing, so the gradient of `x` on each rank holds only its own positions; the sum
    over ranks is the full gradient.
    """
    n = x.shape[dim]
    check_length(n, sp.size, what=f"dim {dim} of x")
    c = n // (2 * sp.size)
    a, b = rank_chunks(sp.rank, sp.size)
    return torch.cat([x.narrow(dim, a * c, c), x.narrow(dim, b * c, c)], dim)


def unshard(x: torch.Tensor, sp: SequenceParallel, dim: int = 1) -> torch.Tensor:
    """The full tensor from every rank's zigzag shard `x`, along `dim` (an all-gather).

    The result is the same on every rank and is assumed to be used the same way on every rank
    (a replicated loss): the gradient of each shard is its slice of the full gradient.
    """
    return _Unshard.apply(x, sp, dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp, dim):
        ctx.sp, ctx.dim = sp, dim
        local = x.shape[dim]
        moved = x.movedim(dim, 0)  # (2C, ...)
        got = all_to_all(moved.repeat(sp.size, *([1] * (moved.dim() - 1))), [local] * sp.size, [local] * sp.size,
                         sp)  # (P * 2C, ...), grouped by source rank
        full = torch.empty_like(got).index_copy_(0, _gathered_positions(sp.size, local).to(x.device), got)
        return full.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return shard(grad, ctx.sp, ctx.dim), None, None


@functools.lru_cache(maxsize=64)
def _gathered_positions(size: int, local_len: int) -> torch.Tensor:
    """The global position of each row of every rank's shard, rank by rank (what an all-to-all of the
    shards returns): built once per shape, not on every call."""
    return torch.cat([global_positions_of(r, size, local_len) for r in range(size)])


def global_positions_of(rank: int, size: int, local_len: int) -> torch.Tensor:
    c = local_len // 2
    a, b = rank_chunks(rank, size)
    ar = torch.arange(c)
    return torch.cat([a * c + ar, b * c + ar])
