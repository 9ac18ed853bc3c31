"""A small LLaMA-style decoder whose attention is NSA (or, as a baseline, dense or sliding-window): RMSNorm,
RoPE on global positions, SwiGLU. `ModelConfig` also says which model the trainer builds (nsa_dist.nn.build.build_model)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nsa_dist.nn.convert import GATE_INITS
from nsa_dist.nn.layer import DenseAttention, NativeSparseAttention, NSAConfig, WindowAttention

MODEL_KINDS = ("nsa", "hf_llama")
ATTENTIONS = ("nsa", "dense", "window")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, and which model is built from it: `kind="nsa"` is `NSATransformer`,
    `kind="hf_llama"` a Hugging Face `LlamaForCausalLM` of the same shape (or loaded from
    `pretrained_path`) converted to NSA with `gate_init`. `attention="dense"` keeps full causal
    attention instead of NSA, the baseline of every comparison; `attention="window"` (kind nsa) attends
    over the last `nsa.window` keys only, NSA less its compressed and selected branches."""

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int | None = None  # None: about 8/3 hidden, rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    kind: str = "nsa"
    attention: str = "nsa"
    pretrained_path: str | None = None  # kind=hf_llama: a local Hugging Face checkpoint directory
    gate_init: str = "preserve"  # kind=hf_llama: how the converted gates start (nsa_dist.convert_attention)

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-8 * self.hidden_size // 3 // 64) * 64

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid model config: {name} must be positive, got {getattr(self, name)}")
        # Either makes every forward NaN (RoPE's frequencies theta^(-2i/d), RMSNorm's sqrt(mean(x^2) + eps)).
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"invalid model config: rope_theta={self.rope_theta} makes the rotary frequencies "
                             "non-finite and every loss NaN; use a positive value (the usual one is 10000)")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ValueError(f"invalid model config: norm_eps={self.norm_eps} puts a negative or non-finite number "
                             "under RMSNorm's square root, and every loss is NaN; use a small positive value (1e-5)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"invalid model config: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        for name, allowed in (("kind", MODEL_KINDS), ("attention", ATTENTIONS), ("gate_init", GATE_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"invalid model config: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.attention == "window" and self.kind != "nsa":
            raise ValueError(f"invalid model config: attention=window is built for kind=nsa, not kind={self.kind}")
        if self.pretrained_path is not None and self.kind != "hf_llama":
            raise ValueError(f"invalid model config: pretrained_path is read by kind=hf_llama only, not "
                             f"kind={self.kind}")
        # A path (not a Hub repo id such as org/name) that is not there would reach Hugging Face's loader,
        # whose message speaks of repo ids.
        if self.pretrained_path and self.pretrained_path.startswith(("/", ".", "~")) \
                and not (Path(self.pretrained_path).expanduser() / "config.json").is_file():
            what = "has no config.json" if Path(self.pretrained_path).expanduser().is_dir() else "does not exist"
            raise ValueError(f"invalid model config: pretrained_path={self.pretrained_path!r} {what}: give the "
                             "directory save_pretrained wrote (config.json and the weights)")
        return self


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, nsa: NSAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if config.attention == "dense":
            self.attn = DenseAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                       rope_theta=config.rope_theta)
        elif config.attention == "window":
            self.attn = WindowAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                        window=nsa.window, rope_theta=config.rope_theta, backend=nsa.backend)
        else:
            self.attn = NativeSparseAttention(config.hidden_size, config.num_heads, config.num_kv_heads,
                                              config.head_dim, nsa, rope_theta=config.rope_theta)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_size)

    def forward(self, x, *, cu_seqlens=None):
        x = x + self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class NSATransformer(nn.Module):
    """`model(tokens [B, T], cu_seqlens=None) -> logits [B, T, vocab]`; `cu_seqlens` packs documents (B == 1).

    Its attention is NSA, or `DenseAttention` with `config.attention="dense"` (which reads no NSAConfig),
    or `WindowAttention` with `config.attention="window"` (which reads `nsa.window` and `nsa.backend`).

    After `nsa_dist.parallelize(model, sp)`, `tokens` is this rank's zigzag shard (nsa_dist.parallel.shard)
    and the logits are the shard of the full-sequence logits; `cu_seqlens` stays global.
    """

    def __init__(self, config: ModelConfig, nsa: NSAConfig = NSAConfig()):
        super().__init__()
        self.config = config
        if config.kind != "nsa":
            raise ValueError(f"NSATransformer is model.kind=nsa; kind={config.kind} is built by nsa_dist.build_model")
        self.nsa = nsa
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, nsa) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self):
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and ".compress_" not in name):
                # φ keeps its own init: a zero output layer, so it starts as mean pooling
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)  # (B, T, hidden)
        for layer in self.layers:
            x = layer(x, cu_seqlens=cu_seqlens)
        return self.lm_head(self.norm(x))
