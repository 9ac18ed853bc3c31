"""What a training step costs: model FLOPs (NSA's real work), phase times, peak memory, bytes exchanged.

The FLOP count is per sequence of `T` tokens, forward only; training counts 3x (the backward does
two matmuls per forward matmul). Matmuls cost 2 FLOPs per multiply-add. Per layer:

- projections and SwiGLU: `2 * T * P_dense`, `P_dense` the layer's weights outside φ;
- φ (compression, K and V): `2 * P_phi * H * T_cmp`, applied to each of the `T_cmp = (T - l) // d + 1`
  blocks of each of the `H` key/value heads;
- compressed attention: scores and weighted sum, `4 * HQ * D * sum_t c(t)` with
  `c(t) = #compressed tokens visible to query t`; the selection pass recomputes the scores: `2 * HQ * D * sum_t c(t)`;
- selected attention: `4 * HQ * D * sum_t min(n * l', t + 1)`;
- sliding window: `4 * HQ * D * sum_t min(w, t + 1)`.

With `model.attention=dense` (the SDPA baseline) a layer has no φ and no gates, and its attention is
`4 * HQ * D * sum_t (t + 1)`; with `model.attention=window` neither, and its attention is the sliding
window's alone, `4 * HQ * D * sum_t min(w, t + 1)`.

Plus the LM head `2 * T * hidden * vocab`. The embedding lookup is free. Causal sums are exact
(counted per position), so a short sequence is not charged for keys it cannot see. Model FLOPs
utilisation = achieved model FLOPs per second per device / the device's peak.
"""
from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig

# Dense bf16 peak per device (FLOP/s, without sparsity), for MFU when trainer.peak_flops is not given.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _causal_sum(seq_len: int, per_query) -> int:
    return int(per_query(np.arange(seq_len, dtype=np.int64)).sum())


def attention_flops(seq_len: int, model: ModelConfig, nsa: NSAConfig) -> int:
    """Forward FLOPs of one layer's three NSA branches (and the top-n scoring) over one sequence."""
    hq, d, l, stride = model.num_heads, model.head_dim, nsa.block_len, nsa.stride
    visible_cmp = _causal_sum(seq_len, lambda t: np.maximum(0, (t + 1 - l) // stride + 1))
    selected = _causal_sum(seq_len, lambda t: np.minimum(nsa.top_n * nsa.select_size, t + 1))
    window = _causal_sum(seq_len, lambda t: np.minimum(nsa.window, t + 1)) if nsa.window else 0
    return hq * d * (4 * visible_cmp + 2 * visible_cmp + 4 * selected + 4 * window)


def dense_attention_flops(seq_len: int, model: ModelConfig) -> int:
    """Forward FLOPs of one layer's causal dense attention (the `model.attention=dense` baseline)."""
    return 4 * model.num_heads * model.head_dim * _causal_sum(seq_len, lambda t: t + 1)


def window_attention_flops(seq_len: int, model: ModelConfig, window: int) -> int:
    """Forward FLOPs of one layer's sliding-window attention alone (the `model.attention=window` baseline)."""
    return 4 * model.num_heads * model.head_dim * _causal_sum(seq_len, lambda t: np.minimum(window, t + 1))


def model_flops_per_sequence(seq_len: int, model: ModelConfig, nsa: NSAConfig, *, training: bool = True) -> int:
    hidden, hq, h, d = model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim
    mlp_and_attention_out = hq * d * hidden + 3 * hidden * model.ffn_size
    if model.attention in ("dense", "window"):
        dense = hidden * hq * d + hidden * 2 * h * d + mlp_and_attention_out
        attention = (dense_attention_flops(seq_len, model) if model.attention == "dense"
                     else window_attention_flops(seq_len, model, nsa.window))
        per_layer = 2 * seq_len * dense + attention
    else:
        kv_sets = 3 if nsa.separate_kv else 1
        branches = 3 if nsa.window else 2
        dense = hidden * hq * d + hidden * kv_sets * 2 * h * d + hidden * branches * hq + mlp_and_attention_out
        phi = nsa.block_len * d + (nsa.block_len * d * 2 * d + 2 * d * d if nsa.compression == "mlp" else 0)
        compressed_tokens = max(0, (seq_len - nsa.block_len) // nsa.stride + 1)
        per_layer = 2 * seq_len * dense + 2 * 2 * phi * h * compressed_tokens + attention_flops(seq_len, model, nsa)
    forward = model.num_layers * per_layer + 2 * seq_len * hidden * model.vocab_size
    return 3 * forward if training else forward


def peak_flops_per_device(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class PhaseTimer:
    """Wall time per named phase of a step; `sync` waits for the GPU so a phase owns its kernels."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()  # host sync: only so the phase times add up
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def exchange_totals(stats: list) -> dict[str, float]:
    """Bytes this rank sent in one step, summed over layer calls, against the all-gather baseline; and,
    when the calls were timed, the seconds of each collective (`<name>_s`, forward and backward,
    summed over layers). Untimed calls add no `_s` entry, so a run without timers logs none rather
    than zeros that would read as measurements."""
    totals = {"exchange_bytes": 0, "halo_bytes": 0, "compressed_bytes": 0, "allgather_bytes": 0,
              "fell_back": 0}
    for s in stats:
        totals["exchange_bytes"] += s.exchange_bytes
        totals["halo_bytes"] += s.halo_bytes
        totals["compressed_bytes"] += s.compressed_bytes
        totals["allgather_bytes"] += s.allgather_bytes
        totals["fell_back"] += int(s.fell_back)
        for name, seconds in s.seconds.items():
            totals[f"{name}_s"] = totals.get(f"{name}_s", 0.0) + seconds
    return totals
