"""`build_model(model_cfg, nsa)`: the model the trainer trains, built the way a user's model comes in.

- `kind="nsa"`: `NSATransformer`, passed through `convert_attention`, which keeps its NSA layers as
  they are (with `attention="dense"` or `"window"` there is nothing to convert: it is a baseline).
- `kind="hf_llama"`: a Hugging Face `LlamaForCausalLM` of the ModelConfig's shape (random init, no
  download), or the local checkpoint at `pretrained_path` (loaded offline; its config must agree
  with the ModelConfig's fields, which the data and the FLOP count read, and the error names the
  overrides that make them agree). Converted with `convert_attention(model, nsa,
  gate_init=model_cfg.gate_init)`; with `attention="dense"` HF's own SDPA attention stays, on one
  process per sequence only (`parallelize` refuses to shard it).

Either way `forward(tokens [B, T]) -> logits [B, T, vocab]`; `nsa_dist.nn.parallelize` comes next.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from nsa_dist.nn.convert import convert_attention
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig, NSATransformer

# ModelConfig field -> LlamaConfig attribute; rope_theta and intermediate_size are read separately
LLAMA_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}


def build_model(model_cfg: ModelConfig, nsa: NSAConfig) -> nn.Module:
    """The model `model_cfg` describes, its attention NSA (with `nsa`) or dense; see the module docstring."""
    if model_cfg.kind == "nsa":
        model = NSATransformer(model_cfg, nsa)
        return model if model_cfg.attention != "nsa" else convert_attention(model, nsa)
    causal_lm = _hf_llama(model_cfg)
    if model_cfg.attention == "nsa":
        causal_lm = convert_attention(causal_lm, nsa, gate_init=model_cfg.gate_init)
    return HFCausalLM(causal_lm)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM called the trainer's way: `forward(tokens, **kwargs) -> logits`.

    The model itself is `causal_lm` (for `save_pretrained`; its parameter names carry that prefix here).
    Keyword arguments (`cu_seqlens=`, `position_ids=`) go to it; no KV cache is built. Converted, it
    refuses `generate()` as every converted model does (NSA keeps no KV cache).
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.causal_lm(input_ids=tokens, use_cache=False, **kwargs).logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def llama_config(model_cfg: ModelConfig):
    """The `LlamaConfig` of `model_cfg`'s architecture (SwiGLU of `ffn_size`, no biases, init std 0.02
    as NSATransformer's)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                       intermediate_size=model_cfg.ffn_size, num_hidden_layers=model_cfg.num_layers,
                       num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
                       head_dim=model_cfg.head_dim, rms_norm_eps=model_cfg.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
                       tie_word_embeddings=model_cfg.tie_embeddings, initializer_range=0.02,
                       attn_implementation="sdpa")


def _hf_llama(model_cfg: ModelConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if model_cfg.pretrained_path is None:
        return LlamaForCausalLM(llama_config(model_cfg))
    path = os.path.expanduser(model_cfg.pretrained_path)
    try:
        causal_lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                                         dtype=torch.float32)
    except OSError as e:
        raise FileNotFoundError(f"model.pretrained_path={model_cfg.pretrained_path!r} is neither a directory here nor "
                                "a model in the local Hugging Face cache (nothing is downloaded): give the directory "
                                "save_pretrained wrote, or fetch the model first (huggingface-cli download <repo>)") from e
    _check_matches(model_cfg, causal_lm.config)
    return causal_lm


def _check_matches(model_cfg: ModelConfig, config) -> None:
    """Raise unless the checkpoint's config is the architecture `model_cfg` states, naming the overrides."""
    stated = {name: getattr(model_cfg, name) for name in LLAMA_FIELDS}
    loaded = {name: getattr(config, attr, None) for name, attr in LLAMA_FIELDS.items()}
    if loaded["head_dim"] is None:
        loaded["head_dim"] = config.hidden_size // config.num_attention_heads
    stated["intermediate_size"], loaded["intermediate_size"] = model_cfg.ffn_size, config.intermediate_size
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        stated["rope_theta"], loaded["rope_theta"] = model_cfg.rope_theta, float(theta)
    differ = {name: loaded[name] for name in stated if stated[name] != loaded[name]}
    if differ:
        overrides = " ".join(f"model.{name}={value}" for name, value in differ.items())
        raise ValueError(f"model.pretrained_path={model_cfg.pretrained_path} holds a different architecture than "
                         f"the model config states (the data and FLOP counts read the config): add {overrides}")
