"""The Native Sparse Attention layer: projections, compression φ, gates, and the three branches.

    x [B, T, hidden] ─ q/k/v projections ─ RoPE (global positions) ─┬─ φ(k), φ(v) ─ compressed attention ─┐
                                                                     ├─ top-n blocks ─ selected attention ──┼─ gated sum ─ o_proj
                                                                     └─ sliding-window attention ───────────┘
The ops live in nsa_dist.kernels; this module owns only the parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nsa_dist.kernels import BACKENDS, compression_blocks, nsa_attention
from nsa_dist.kernels.nsa.layout import token_layout
from nsa_dist.parallel import SequenceParallel, global_positions, sequence_parallel_nsa

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
    backend: str = "torch"

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


class NativeSparseAttention(nn.Module):
    """NSA self-attention over `x [B, T, hidden_size]` → `[B, T, hidden_size]`.

    `num_heads` query heads share `num_kv_heads` key/value heads (group size G >= 1 divides).
    `forward(x, cu_seqlens=None, sp=None)`: `cu_seqlens` packs documents (B == 1); RoPE positions and
    every causal rule then restart per document. With `sp` (a SequenceParallel), `x` is this rank's
    zigzag shard (nsa_dist.parallel.shard), `cu_seqlens` stays global, and the output is the shard
    of what the layer computes on the full sequence; the byte counts land in `sp.stats`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, block_len: int = 32,
                 stride: int = 16, select_size: int = 64, top_n: int = 16, window: int = 512, num_init: int = 1,
                 num_local: int = 2, compression: str = "mlp", separate_kv: bool = False, rope_theta: float = 10000.0,
                 backend: str = "torch"):
        super().__init__()
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be positive and even (RoPE rotates pairs), got {head_dim}")
        self.config = NSAConfig(block_len=block_len, stride=stride, select_size=select_size, top_n=top_n,
                                window=window, num_init=num_init, num_local=num_local, compression=compression,
                                separate_kv=separate_kv, backend=backend).validate()
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.num_kv_sets = 3 if separate_kv else 1  # (cmp, slc, win) or one shared K/V
        self.num_branches = 3 if window else 2
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_sets * 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.gate = nn.Linear(hidden_size, self.num_branches * num_heads)
        self.compress_k = Compression(head_dim, block_len, compression)
        self.compress_v = Compression(head_dim, block_len, compression)

    @classmethod
    def from_config(cls, hidden_size, num_heads, num_kv_heads, head_dim, nsa: NSAConfig, rope_theta=10000.0):
        return cls(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta, **asdict(nsa))

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q `[B, T, HQ, D]`, the K/V sets `[(k, v) per branch set]`, gates `[B, T, HQ]` per branch."""
        B, T, _ = x.shape
        q = rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions, self.rope_theta)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, 2, self.num_kv_heads, self.head_dim)
        kv_sets = [(rope(kv[:, :, i, 0], positions, self.rope_theta), kv[:, :, i, 1]) for i in range(self.num_kv_sets)]
        gates = torch.sigmoid(self.gate(x)).view(B, T, self.num_branches, self.num_heads).unbind(2)
        return q, kv_sets, gates

    def compress(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """Compressed keys and values `[B, Tc, H, D]` of whole blocks of `k`, `v` `[B, T, H, D]`."""
        c = self.config
        return (self.compress_k(compression_blocks(k, c.block_len, c.stride, cu_seqlens)),
                self.compress_v(compression_blocks(v, c.block_len, c.stride, cu_seqlens)))

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, sp: SequenceParallel | None = None):
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected x [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if sp is not None:
            return self._forward_shard(x, cu_seqlens, sp)
        B, T, _ = x.shape
        c = self.config
        positions = token_layout(0, T, cu_seqlens, x.device).pos
        q, kv_sets, gates = self.project(x, positions)
        (k_cmp_src, v_cmp_src), (k_slc, v_slc), (k_win, v_win) = (kv_sets * 3)[:3] if len(kv_sets) == 1 else kv_sets
        k_cmp, v_cmp = self.compress(k_cmp_src, v_cmp_src, cu_seqlens)
        o = nsa_attention(q, k_slc, v_slc, k_cmp, v_cmp, gates[0], gates[1], gates[2] if c.window else None,
                          block_len=c.block_len, stride=c.stride, select_size=c.select_size, top_n=c.top_n,
                          window=c.window, num_init=c.num_init, num_local=c.num_local, cu_seqlens=cu_seqlens,
                          k_win=k_win, v_win=v_win, backend=c.backend)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _forward_shard(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, sp: SequenceParallel):
        B, T, _ = x.shape
        g = global_positions(sp, T, x.device)
        if cu_seqlens is None:
            positions = g
        else:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
            positions = g - cu[(torch.searchsorted(cu, g, right=True) - 1).clamp(0, cu.numel() - 2)]
        q, kv_sets, gates = self.project(x, positions)
        o = sequence_parallel_nsa(q, kv_sets, gates, compress_k=self.compress_k, compress_v=self.compress_v,
                                  config=self.config, sp=sp, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
