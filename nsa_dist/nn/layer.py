"""The Native Sparse Attention layer: projections, compression φ, gates, and the three branches.

    x [B, T, hidden] ─ q/k/v projections ─ RoPE (global positions) ─┬─ φ(k), φ(v) ─ compressed attention ─┐
                                                                     ├─ top-n blocks ─ selected attention ──┼─ gated sum ─ o_proj
                                                                     └─ sliding-window attention ───────────┘
`SparseAttention` is everything right of RoPE (φ, the gates, the op sequence), for a model that brings
its own projections and rotary embedding; `NativeSparseAttention` owns one with `RotaryProjections`
(q/k/v/o and RoPE). `DenseAttention` is the baseline every comparison runs against: the same
projections module, then causal softmax attention over every past key (no φ, no gates);
`WindowAttention`, the other baseline, keeps NSA's sliding-window branch alone.
One op sequence (nsa_dist.parallel.nsa_forward) serves one rank and a sequence shard alike; the ops
live in nsa_dist.kernels, and these modules own only the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from nsa_dist.kernels import BACKENDS, window_attention
from nsa_dist.parallel import (ExchangeLog, ExchangeStats, PlanCache, SequenceParallel, all_gather_bytes,
                               document_positions, gather_sequence_kv, local_chunks, nsa_forward)
from nsa_dist.parallel.attention import with_halo

COMPRESSIONS = ("mlp", "mean")


@dataclass(frozen=True)
class NSAConfig:
    """NSA knobs; defaults are the paper's (l=32, d=16, l'=64, n=16 with 1 initial + 2 local, w=512)."""

    block_len: int = 32  # l: keys per compressed token
    stride: int = 16  # d: distance between compressed tokens
    select_size: int = 64  # l': keys per selection block
    top_n: int = 16  # n: selected blocks per query, forced ones included
    window: int = 512  # w: sliding window; 0 drops the branch
    num_init: int = 1
    num_local: int = 2
    compression: str = "mlp"  # φ: "mlp" (learned, with intra-block positions) or "mean"
    separate_kv: bool = False  # independent K/V projections per branch
    backend: str = "auto"  # "triton" on CUDA tensors, the torch reference otherwise

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "NSAConfig":
        def bad(msg):
            raise ValueError(f"invalid NSA config: {msg}")

        if self.stride <= 0 or self.block_len < self.stride:
            bad(f"need 0 < stride <= block_len, got block_len={self.block_len}, stride={self.stride}")
        if self.select_size <= 0 or self.select_size % self.stride:
            bad(f"select_size (l'={self.select_size}) must be a positive multiple of stride (d={self.stride})")
        if self.window < 0:
            bad(f"window must be positive (or 0 to drop the sliding-window branch), got {self.window}")
        if self.num_init < 0 or self.num_local < 0 or self.top_n < self.num_init + self.num_local:
            bad(f"top_n={self.top_n} must be >= num_init + num_local = {self.num_init + self.num_local} (both >= 0)")
        if self.compression not in COMPRESSIONS:
            bad(f"compression={self.compression!r}; choose one of {COMPRESSIONS}")
        if self.backend not in BACKENDS:
            bad(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        return self


class Compression(nn.Module):
    """φ: one block of `block_len` keys (or values) → one compressed token, per head.

    An intra-block position encoding is added to every key of the block; "mean" then averages,
    "mlp" adds an MLP over the whole flattened block to that average (the mean is a skip path, so
    training starts from plain mean pooling and φ learns the correction).
    """

    def __init__(self, head_dim: int, block_len: int, kind: str):
        super().__init__()
        self.kind = kind
        self.pos = nn.Parameter(torch.randn(block_len, head_dim) * 0.02)
        if kind == "mlp":
            hidden = 2 * head_dim
            self.mlp = nn.Sequential(nn.Linear(block_len * head_dim, hidden), nn.SiLU(), nn.Linear(hidden, head_dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        # in the blocks' dtype: an fp32 table would promote bf16 keys, and the ops refuse mixed dtypes
        x = blocks + self.pos.to(blocks.dtype)[:, None, :]  # (B, Tc, l, H, D)
        out = x.mean(2)  # (B, Tc, H, D)
        if self.kind == "mlp":
            out = out + self.mlp(x.permute(0, 1, 3, 2, 4).flatten(-2))  # (B, Tc, H, l*D) → (B, Tc, H, D)
        return out.to(blocks.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of `x [B, T, H, D]` at integer `positions [T]`."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RotaryProjections(nn.Module):
    """q/k/v/o projections and RoPE at given positions: one module, owned by the NSA layer and by its dense
    baseline alike (`proj`), so that both hold the same parameters under the same names and init.

    `num_kv_sets` is 3 for independent K/V per NSA branch (compression, selection, window), else 1.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope_theta: float,
                 num_kv_sets: int = 1):
        super().__init__()
        check_heads(num_heads, num_kv_heads, head_dim)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.rope_theta, self.num_kv_sets = rope_theta, num_kv_sets
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, num_kv_sets * 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        """q `[B, T, HQ, D]` and k, v `[B, T, H, D]` (three of each with `num_kv_sets == 3`), rotated at `positions`."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected x [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions, self.rope_theta)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, 2, self.num_kv_heads, self.head_dim)
        k = [rope(kv[:, :, i, 0], positions, self.rope_theta) for i in range(self.num_kv_sets)]
        v = [kv[:, :, i, 1] for i in range(self.num_kv_sets)]
        return (q, k[0], v[0]) if self.num_kv_sets == 1 else (q, tuple(k), tuple(v))

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The attention output `[B, T, HQ, Dv]` back to `[B, T, hidden_size]`."""
        return self.o_proj(o.flatten(2))


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int | None = None):
    """Query heads in whole groups per K/V head; with `head_dim`, one that RoPE can rotate."""
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if head_dim is not None and (head_dim <= 0 or head_dim % 2):
        raise ValueError(f"head_dim must be positive and even (RoPE rotates pairs), got {head_dim}")


class ShardedAttention:
    """What `nsa_dist.parallelize` installs on an attention layer, the one way a layer learns of sequence
    parallelism: `sp`, the SequenceParallel handle (None: the whole sequence is here), and
    `exchange_log`, the ExchangeLog its byte counts go into (None: not recorded). The index plans that
    depend only on shapes are kept per layer (`plans`)."""

    sp: SequenceParallel | None = None
    exchange_log: ExchangeLog | None = None


class SparseAttention(ShardedAttention, nn.Module):
    """NSA over queries, keys and values that are already projected and rotated: compression φ for K and
    V, the branch gates (`gate`, from the layer input `x`) and the op sequence.

    `forward(x, q, k, v, *, cu_seqlens=None) -> o [B, T, HQ, Dv]` with `x [B, T, hidden_size]`,
    `q [B, T, HQ, D]` and `k`, `v` `[B, T, H, D]` (or, with `separate_kv`, three of each: compression,
    selection, window). Once parallelized over `sp`, every tensor is this rank's zigzag shard
    (nsa_dist.parallel.shard) and `cu_seqlens` stays global.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, config: NSAConfig):
        super().__init__()
        check_heads(num_heads, num_kv_heads)
        self.config = config
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.num_branches = 3 if config.window else 2
        self.plans = PlanCache()
        self.gate = nn.Linear(hidden_size, self.num_branches * num_heads)
        self.compress_k = Compression(head_dim, config.block_len, config.compression)
        self.compress_v = Compression(head_dim, config.block_len, config.compression)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k, v, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        gates = torch.sigmoid(self.gate(x)).view(B, T, self.num_branches, self.num_heads).unbind(2)
        return nsa_forward(q, k, v, gates, compress_k=self.compress_k, compress_v=self.compress_v, config=self.config,
                           sp=self.sp, cu_seqlens=cu_seqlens, plans=self.plans, exchange_log=self.exchange_log)


class NativeSparseAttention(nn.Module):
    """NSA self-attention over `x [B, T, hidden_size]` → `[B, T, hidden_size]`: the projections and RoPE
    (`proj`) around the NSA core (`nsa`, a `SparseAttention`).

    `num_heads` query heads share `num_kv_heads` key/value heads (group size G >= 1 divides).
    `forward(x, cu_seqlens=None)`: `cu_seqlens` packs documents (B == 1); RoPE positions and every causal
    rule then restart per document. Once parallelized over `sp`, `x` is this rank's zigzag shard
    (nsa_dist.parallel.shard), `cu_seqlens` stays global, and the output is the shard of what the layer
    computes on the full sequence.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, nsa: NSAConfig | None = None,
                 *, rope_theta: float = 10000.0, **knobs):
        """`nsa`, or its fields as keywords (`block_len=32, window=512, ...`), not both."""
        if nsa is None:
            nsa = NSAConfig(**knobs)
        elif knobs:
            raise TypeError(f"pass an NSAConfig or its fields as keywords, not both (got nsa and {sorted(knobs)})")
        super().__init__()
        # projections first: construction order fixes what a seed initialises and the parameter order
        self.proj = RotaryProjections(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta,
                                      num_kv_sets=3 if nsa.separate_kv else 1)
        self.nsa = SparseAttention(hidden_size, num_heads, num_kv_heads, head_dim, nsa)

    @property
    def config(self) -> NSAConfig:
        return self.nsa.config

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        positions = document_positions(self.nsa.sp, x.shape[1], cu_seqlens, x.device, plans=self.nsa.plans)
        q, k, v = self.proj(x, positions)
        return self.proj.output(self.nsa(x, q, k, v, cu_seqlens=cu_seqlens))


class ProjectedAttention(ShardedAttention, nn.Module):
    """What the baselines share with the NSA layer: its projections and RoPE (`proj`, same names and init),
    applied at the global positions of this rank's tokens (`project`)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope_theta: float):
        super().__init__()
        self.proj = RotaryProjections(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta)
        self.plans = PlanCache()

    def project(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None):
        """q `[B, T, HQ, D]`, k, v `[B, T, H, D]` of this rank's `x`, rotated at their global positions."""
        return self.proj(x, document_positions(self.sp, x.shape[1], cu_seqlens, x.device, plans=self.plans))


class DenseAttention(ProjectedAttention):
    """Causal softmax attention over every past key (SDPA, GQA), NSA's baseline: the projections and RoPE of
    `NativeSparseAttention` (`proj`, same names and init), without φ and gates, so that a comparison of
    the two changes only the attention.

    `forward(x, *, cu_seqlens=None)` as the NSA layer's: `cu_seqlens` packs documents (B == 1; attention
    and RoPE restart per document). Once parallelized over `sp`, `x` is this rank's zigzag shard; every
    rank all-gathers the K/V of the whole sequence (the plain context-parallel scheme,
    nsa_dist.parallel.gather_sequence_kv) and each of its two chunks attends to the keys up to the chunk's
    end; the gradients of the gathered K/V return to their owners and are summed there.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_theta: float = 10000.0):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        T, sp = x.shape[1], self.sp
        q, k, v = self.project(x, cu_seqlens)
        if sp is not None:
            k, v = gather_sequence_kv(k, v, sp, self.plans, self.exchange_log)  # (B, N, H, D) each, global order
        return self.proj.output(causal_attention(q, k, v, local_chunks(T, sp).starts, cu_seqlens))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_starts: tuple = (0,),
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of `q [B, T, HQ, D]` over `k`, `v` `[B, N, H, D]` (the whole sequence), each query
    seeing the keys at or before it (and, with `cu_seqlens`, in its document). `q` holds equal chunks
    of consecutive queries starting at the global positions `chunk_starts`."""
    C = q.shape[1] // len(chunk_starts)
    if cu_seqlens is not None:
        keys = torch.arange(k.shape[1], device=q.device)
        queries = torch.cat([start + torch.arange(C, device=q.device) for start in chunk_starts])
        document = torch.searchsorted(cu_seqlens.to(device=q.device, dtype=torch.int64), keys, right=True)  # (N,)
        mask = (keys[None, :] <= queries[:, None]) & (document[None, :] == document[queries][:, None])  # (T, N)
        return _sdpa(q, k, v, mask)
    # A chunk sees the keys up to its last query: a lower-right causal mask over that prefix, which SDPA's
    # fused kernels take without a [T, N] mask in memory.
    return torch.cat([_sdpa(q[:, j * C:(j + 1) * C], k[:, :start + C], v[:, :start + C],
                            causal_lower_right(C, start + C) if start else None)
                      for j, start in enumerate(chunk_starts)], 1)


def _sdpa(q, k, v, mask):
    """SDPA in the ops' layout `[B, T, heads, D]`; no mask means causal over keys aligned with queries."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=True)  # (B, HQ, T, D)
    return o.transpose(1, 2)


class WindowAttention(ProjectedAttention):
    """Causal attention over the last `window` keys only (the query at `t` sees `(t - window, t]` of its
    document): NSA without its compressed and selected branches, the baseline that shows what those
    branches add at far positions. The projections and RoPE of `NativeSparseAttention` (`proj`), no
    gates; the math is nsa_dist.kernels.window_attention (Triton on CUDA with `backend="auto"`).

    `forward(x, *, cu_seqlens=None)` as the NSA layer's. Once parallelized over `sp`, `x` is this rank's
    zigzag shard, and each local chunk receives the `window - 1` keys before it (the halo, NSA's own
    exchange), whatever the length of the sequence.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, window: int,
                 rope_theta: float = 10000.0, backend: str = "auto"):
        if window <= 0:
            raise ValueError(f"model.attention=window attends over the last nsa.window keys: set nsa.window > 0, "
                             f"got {window}")
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta)
        self.window, self.backend = window, backend

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        T, sp = x.shape[1], self.sp
        q, k, v = self.project(x, cu_seqlens)
        chunks = local_chunks(T, sp)
        extended, halo_bytes = with_halo([k, v], sp, self.window - 1, self.plans)  # [((k, v) with halo, first)]
        outs = [window_attention(qj, kv[0], kv[1], window=self.window, q_offset=start, k_offset=first,
                                 cu_seqlens=cu_seqlens, backend=self.backend)
                for qj, start, (kv, first) in zip(q.split(chunks.chunk_len, 1), chunks.starts, extended)]
        if sp is not None and self.exchange_log is not None:
            # against what dense attention's all-gather of the same K/V sends
            gathered = all_gather_bytes(T, 2 * k[:, :1].numel() * k.element_size(), sp.size)
            self.exchange_log.record(ExchangeStats(mode="halo", fell_back=False, exchange_bytes=0, halo_bytes=halo_bytes,
                                                   compressed_bytes=0, allgather_bytes=gathered, blocks_fetched=0))
        return self.proj.output(torch.cat(outs, 1))  # (B, T, hidden)


ATTENTION_LAYERS = (SparseAttention, DenseAttention, WindowAttention)  # what nsa_dist.nn.parallelize runs on sequence shards
