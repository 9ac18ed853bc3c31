"""Synthetic top-n block ids for timing selected attention, in three routing patterns.

Every query `t` (block `b = t // 64`) takes the initial block 0 and its two local blocks `b - 1, b`;
queries with `b + 1 <= n` take blocks `0 .. b`. The other `n - 3` slots are drawn from `[1, b - 2]`:

  rand     per query, uniformly: neighbours share only the forced blocks (a tile of 4 queries of one
           KV head touches ~51 distinct blocks of n = 16 at 64k, 64 queries ~380).
  blk      per query block: the 64 queries of a block share all n (4 queries: 16, 64 queries: 16).
  trained  between the two, shaped like the routers of trained models (the union of 4 consecutive
           queries' blocks per KV head was 21-30 there, of 64 queries 37-60): for each (KV head,
           query block) a pool of `POOL` past blocks is drawn; the block's first query takes `n - 3`
           of them at random, and each next query swaps `SWAPS` of its blocks for pool blocks it does
           not hold. A query shares most blocks with its neighbours, and a whole block of queries
           stays within its pool: 4 queries ~24 blocks, 64 queries ~47 at 64k (`union_sizes` measures it).

Ids ascending, -1 in unused slots: `[1, T, H, n]` int32, the layout of `nsa_dist.kernels`.
"""
from __future__ import annotations

import torch

PATTERNS = ("rand", "blk", "trained")
POOL, SWAPS = 45, 3
_FORCED = 3  # the initial block and the two local ones


def _free_scores(b, nb, H, gen, device):
    """Random scores over blocks for query blocks `b [C]`, -1 where a block may not be drawn."""
    cols = torch.arange(nb, device=device)
    sc = torch.rand(H, b.numel(), nb, device=device, generator=gen)
    ok = (cols[None, :] >= 1) & (cols[None, :] <= b[:, None] - 2)
    return torch.where(ok[None], sc, torch.full_like(sc, -1.0))


def _assemble(b, free, n):
    """Forced blocks + drawn ones `free [H, C, n - 3]` (-1: none) -> `[H, C, n]` ascending, -1 last."""
    H, C, _ = free.shape
    bb = b.view(1, C, 1).expand(H, C, 1)
    ids = torch.cat([torch.zeros_like(bb), bb - 1, bb, free], -1)
    slots = torch.arange(n, device=b.device).view(1, 1, n)
    ids = torch.where(bb + 1 <= n, torch.where(slots <= bb, slots.expand(H, C, n), -1), ids)
    big = torch.iinfo(ids.dtype).max
    ids = torch.where(ids < 0, big, ids).sort(-1).values
    return torch.where(ids == big, -1, ids)


def _draw(sc, k):
    """The k highest-scoring allowed blocks per row, -1 where fewer are allowed."""
    top = sc.topk(min(k, sc.shape[-1]), -1)
    ids = torch.where(top.values >= 0, top.indices, -1)
    return torch.cat([ids, ids.new_full((*ids.shape[:-1], k - ids.shape[-1]), -1)], -1)


def _trained(nb, H, n, sel, gen, device):
    """`[H, nb * sel, n - 3]` drawn ids of the drifting-pool pattern (see the module docstring)."""
    free = n - _FORCED
    c = torch.arange(nb, device=device)
    pool = _draw(_free_scores(c, nb, H, gen, device), POOL)  # (H, nb, P), -1 past the allowed ones
    P = pool.shape[-1]
    valid = pool >= 0
    start = torch.where(valid, torch.rand(pool.shape, device=device, generator=gen), -1.0)
    on = torch.zeros_like(valid)
    on.scatter_(-1, start.topk(min(free, P), -1).indices, True)
    on &= valid
    can_swap = (valid.sum(-1, keepdim=True) >= free + SWAPS)  # pools too small to drift keep their draw
    steps = []
    for _ in range(sel):
        held = torch.where(on, pool, -1)
        steps.append(held.sort(-1, descending=True).values[..., :free])
        out_sc = torch.where(on, torch.rand(pool.shape, device=device, generator=gen), -1.0)
        in_sc = torch.where(valid & ~on, torch.rand(pool.shape, device=device, generator=gen), -1.0)
        drop = torch.zeros_like(on).scatter_(-1, out_sc.topk(SWAPS, -1).indices, True)
        take = torch.zeros_like(on).scatter_(-1, in_sc.topk(SWAPS, -1).indices, True)
        on = torch.where(can_swap, (on & ~drop) | (take & valid), on)
    return torch.stack(steps, 2).reshape(H, nb * sel, free)  # (H, nb, sel, free) -> per query


def block_ids(T, H, pattern, *, n=16, sel=64, seed=0, device="cpu", chunk=4096):
    """`[1, T, H, n]` int32 block ids of `pattern` (rand | blk | trained) for T queries, H KV heads."""
    if pattern not in PATTERNS:
        raise ValueError(f"routing {pattern!r}: choose from {PATTERNS}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = -(-T // sel)
    qblk = torch.arange(T, device=device) // sel
    free = n - _FORCED
    if pattern == "rand":
        out = torch.cat([_assemble(qblk[s:s + chunk], _draw(_free_scores(qblk[s:s + chunk], nb, H, gen, device), free), n)
                         for s in range(0, T, chunk)], 1)
    elif pattern == "blk":
        c = torch.arange(nb, device=device)
        per_block = torch.cat([_draw(_free_scores(c[s:s + chunk], nb, H, gen, device), free)
                               for s in range(0, nb, chunk)], 1)
        out = _assemble(qblk, per_block[:, qblk], n)
    else:
        out = _assemble(qblk, _trained(nb, H, n, sel, gen, device)[:, :T], n)
    return out.permute(1, 0, 2).unsqueeze(0).to(torch.int32).contiguous()  # (1, T, H, n)


def union_sizes(idx, sizes=(4, 64), skip=1024):
    """Mean number of distinct blocks per KV head over aligned runs of `size` queries, after the first
    `skip` queries (whose short past caps the union): {size: mean}."""
    _, T, H, n = idx.shape
    out = {}
    for m in sizes:
        s0 = -(-skip // m) * m
        L = (T - s0) // m * m
        if L <= 0:
            continue
        ids = idx[0, s0:s0 + L].permute(1, 0, 2).reshape(H, L // m, m * n).long().sort(-1).values
        new = torch.ones_like(ids, dtype=torch.bool)
        new[..., 1:] = ids[..., 1:] != ids[..., :-1]
        out[m] = ((new & (ids >= 0)).sum(-1).float().mean().item())
    return out


if __name__ == "__main__":
    for pat in PATTERNS:
        print(pat, {m: round(u, 1) for m, u in union_sizes(block_ids(16384, 4, pat)).items()})
