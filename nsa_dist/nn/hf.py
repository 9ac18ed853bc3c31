"""Hugging Face Llama-family models under NSA: the adapter behind `convert_attention`.

An attention module qualifies when it has separate `q_proj`, `k_proj`, `v_proj`, `o_proj` linears
(optionally Qwen3's per-head `q_norm` / `k_norm`) and its forward receives `position_embeddings`
(cos, sin) from the model's own rotary embedding: Llama, Mistral, Qwen2, Qwen3 and their copies.
It becomes an `HFSparseAttention` that reuses those modules and adds NSA's φ and gates.

Converting also changes three things about the model, all so that nothing silently goes wrong:
- its attention implementation becomes "nsa", registered with transformers' AttentionInterface but
  not with the mask interface, so transformers builds no `[B, 1, T, T]` mask (NSA reads none);
- `config.use_cache = False`: NSA keeps no KV cache, and a plain forward would otherwise build one;
- a forward pre-hook on the base model (the module holding `rotary_emb`) checks the inputs and turns
  packed-document `position_ids` (restarting at 0) into `cu_seqlens` for the NSA ops; after
  `supply_global_positions(model, sp)` it supplies each shard's global positions instead.

transformers is imported only when a model is converted: it is an optional dependency.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from nsa_dist.nn.layer import NSAConfig, SparseAttention
from nsa_dist.parallel import SequenceParallel, document_positions, packed_cu_seqlens

ATTENTION_IMPLEMENTATION = "nsa"
NSA_CONFIG_KEY = "nsa_config"  # the converted model's NSAConfig, in its Hugging Face config
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
HEAD_NORMS = ("q_norm", "k_norm")


def is_llama_attention(module: nn.Module) -> bool:
    """Claims every `...Attention` module that is handed `position_embeddings`; those it cannot map
    are refused by `convert_llama_attention` with the reason, rather than passed over in silence."""
    if isinstance(module, SparseAttention) or not type(module).__name__.endswith("Attention"):
        return False
    try:
        return "position_embeddings" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def convert_llama_attention(name: str, module: nn.Module, nsa: NSAConfig | None, gates) -> "HFSparseAttention":
    """The NSA replacement of one Llama-family attention module, or a ValueError saying why not."""
    nsa = NSAConfig() if nsa is None else nsa
    where = f"{name or 'the model'} ({type(module).__name__})"

    def refuse(why: str, fix: str):
        raise ValueError(f"cannot convert {where} to NSA: {why}. {fix}")

    children = dict(module.named_children())
    if not all(isinstance(children.get(p), nn.Linear) for p in PROJECTIONS):
        refuse(f"it has no separate {'/'.join(PROJECTIONS)} linears (its parts: {', '.join(children) or 'none'})",
               "Register an adapter for this architecture with nsa_dist.register_adapter")
    extra = [c for c in children if c not in PROJECTIONS + HEAD_NORMS] + list(module._parameters)
    if extra:
        refuse(f"it has parts the NSA replacement would drop: {', '.join(extra)}",
               "Register an adapter that maps them with nsa_dist.register_adapter")
    q, k, v, o = (children[p] for p in PROJECTIONS)
    head_dim = getattr(module, "head_dim", None)
    if not head_dim or q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features \
            or o.in_features != q.out_features:
        refuse(f"its projections ({q.out_features}, {k.out_features}, {v.out_features} -> {o.in_features}) do "
               f"not split into heads of head_dim={head_dim}", "Register an adapter for it")
    num_heads, num_kv_heads = q.out_features // head_dim, k.out_features // head_dim
    for norm in HEAD_NORMS:
        weight = getattr(children.get(norm), "weight", None)
        if norm in children and (weight is None or weight.numel() != head_dim):
            refuse(f"its {norm} does not normalise single heads of {head_dim}", "Register an adapter for it")
    config = getattr(module, "config", None)
    window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
    if window is not None:
        refuse(f"it attends through a sliding window of {window} tokens, which NSA's branches do not reproduce "
               "beyond that length",
               "If the model was trained on sequences no longer than the window, or you accept the change, set "
               "config.sliding_window = None (and use_sliding_window = False) before converting")
    scaling = getattr(module, "scaling", head_dim ** -0.5)
    if not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        refuse(f"it scales scores by {scaling}, not 1/sqrt(head_dim) as the NSA ops do", "Register an adapter for it")
    if not getattr(module, "is_causal", True):
        refuse("it is not causal", "NSA is causal attention only")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        refuse("it soft-caps its attention logits", "Set config.attn_logit_softcapping = None to convert anyway")
    if getattr(config, "attention_dropout", 0.0):
        refuse(f"attention_dropout={config.attention_dropout}; the NSA ops have no attention dropout",
               "Set config.attention_dropout = 0.0 before converting")
    rotate = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rotate is None or "unsqueeze_dim" not in inspect.signature(rotate).parameters:
        refuse(f"its module {type(module).__module__} has no apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)",
               "Register an adapter that applies its rotary embedding")
    if nsa.separate_kv:
        refuse("separate_kv=True needs one K/V projection per branch, and the model has one",
               "Use NSAConfig(separate_kv=False)")
    if gates.preserves and not nsa.window:
        refuse("the preserving gate init keeps the model's attention in the sliding-window branch, and "
               "window=0 drops that branch", "Give NSAConfig a window, or pass gate_init='uniform'")
    return HFSparseAttention(module, nsa, gates, num_heads=num_heads, num_kv_heads=num_kv_heads, rotate=rotate,
                             source_name=where)


class HFSparseAttention(SparseAttention):
    """A Llama-family attention module turned NSA: the original `q_proj`, `k_proj`, `v_proj`, `o_proj`
    (and `q_norm`, `k_norm`) under their original names, and the model's rotary embedding, around the
    NSA core (`SparseAttention`: φ for K and V, the gates, the op sequence).

    Called as transformers calls attention: `forward(hidden_states, position_embeddings, attention_mask,
    ...) -> (output, None)`. `attention_mask` is not read: the model's input hook has refused anything a
    mask would say that NSA does not (padding), and packed documents arrive as `cu_seqlens`. Sequence
    parallelism is installed by nsa_dist.parallelize, as on every NSA layer.
    """

    def __init__(self, source: nn.Module, nsa: NSAConfig, gates, *, num_heads: int, num_kv_heads: int, rotate,
                 source_name: str | None = None):
        super().__init__(source.q_proj.in_features, num_heads, num_kv_heads, source.head_dim, nsa)
        for part in PROJECTIONS + HEAD_NORMS:
            if hasattr(source, part):
                setattr(self, part, getattr(source, part))
        self.source = source_name or type(source).__name__
        self.layer_idx = getattr(source, "layer_idx", None)
        self.rotate = rotate
        weight = source.q_proj.weight
        for new in (self.gate, self.compress_k, self.compress_v):
            new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.copy_(torch.tensor(gates.biases[:self.num_branches]).repeat_interleave(num_heads))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None, *,
                position_ids=None, use_cache=None, past_key_values=None, cu_seqlens=None, **kwargs):
        if cache is not None or past_key_values is not None or use_cache:
            raise NotImplementedError(
                f"{self.source} is NSA now and keeps no KV cache: call it with use_cache=False (the default after "
                "convert_attention; generate() then runs the whole forward for every new token)")
        if position_embeddings is None:
            raise ValueError(f"{self.source} needs position_embeddings=(cos, sin) from the model's rotary embedding")
        B, T, _ = hidden_states.shape
        if self.sp is not None:
            self._check_global_positions(position_ids, T, cu_seqlens, self.sp)
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
        if hasattr(self, "k_norm"):
            k = self.k_norm(k)
        cos, sin = position_embeddings
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"{self.source}: the rotary embedding covers {cos.shape[-1]} of {self.head_dim} head "
                             "dims; partial rotary embeddings need their own adapter")
        q, k = self.rotate(q, k, cos, sin, unsqueeze_dim=2)  # q, k are [B, T, heads, D]
        o = super().forward(hidden_states, q, k, v, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim)), None

    def _check_global_positions(self, position_ids, T, cu_seqlens, sp):
        expected = None if position_ids is None else document_positions(sp, T, cu_seqlens, position_ids.device,
                                                                         plans=self.plans)
        if expected is None or not bool((position_ids == expected).all()):
            raise ValueError(f"{self.source} runs sequence-parallel, but the position_ids the rotary embedding used "
                             "are not this rank's global positions: parallelize the whole model with nsa_dist.parallelize(model, sp), "
                             "not its layers one by one")


class ModelInputs:
    """The base model's forward pre-hook: inputs a converted model can honour, or a clear error.

    - `attention_mask`: only all-ones (no padding) is accepted, and dropped; NSA has no mask, so pack
      documents instead (position_ids that restart at 0, or `cu_seqlens`).
    - one process: `position_ids` must be `0..T-1`, or (batch 1) restart at 0 at each packed document;
      the restarts become `cu_seqlens` for the NSA ops.
    - sequence-parallel (`sp` installed by nsa_dist.parallelize): the inputs are zigzag shards; the
      hook supplies the shard's global positions (per document with a global `cu_seqlens=` keyword)
      and refuses `position_ids` that are anything else. Packed documents are given as the global
      `cu_seqlens`, not as restarting position_ids, which a shard cannot see whole.
    """

    def __init__(self, base: nn.Module):
        self.signature = inspect.signature(base.forward)
        self.sp: SequenceParallel | None = None
        self.dense_layers: list[str] = []

    def __call__(self, module, args, kwargs):
        kw = self._as_keywords(args, kwargs)
        tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if tokens is None:
            return args, kwargs
        B, T = tokens.shape[:2]
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or not bool(mask.all()):
                raise ValueError(f"{type(module).__name__} is NSA now and reads no attention mask, so padding "
                                 f"(an attention_mask with zeros, or a {mask.dim()}-d mask) cannot be honoured; "
                                 "pack documents instead: position_ids that restart at 0 at each document "
                                 "(one process) or a global cu_seqlens= keyword")
            kw["attention_mask"] = None
        cu, given = kw.get("cu_seqlens"), kw.get("position_ids")
        if self.sp is None and cu is None and given is not None:
            cu = packed_cu_seqlens(given)
        if self.sp is not None and cu is None and given is not None and bool((given == 0).sum(-1).gt(1).any()):
            raise ValueError("position_ids that restart at 0 mark packed documents, which a sequence shard cannot "
                             "see whole; pass the global document boundaries as cu_seqlens= instead")
        expected = document_positions(self.sp, T, cu, tokens.device)
        if given is not None and not bool((given == expected).all()):
            where = ("this rank's global positions (nsa_dist.parallel.shard of the full position_ids)"
                     if self.sp is not None else "0..T-1, or 0, 1, 2, ... within each packed document")
            raise ValueError(f"position_ids must be {where}: NSA's causal rules follow token order, so other "
                             "positions would rotate keys and queries inconsistently with what attends to what")
        kw["position_ids"] = expected.unsqueeze(0).expand(B, T)
        if cu is not None:
            kw["cu_seqlens"] = cu
        return (), kw

    def _as_keywords(self, args, kwargs) -> dict:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        kw = {}
        for name, value in bound.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
        return kw


def input_hooks(model: nn.Module) -> list[ModelInputs]:
    """The input hooks of the converted base models in `model` (kept with the modules, so a deep copy
    of a converted model has its own)."""
    return [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, ModelInputs)]


def finish_conversion(model: nn.Module, converted: list, skipped: list):
    """Model-level changes after the attention modules are replaced (see the module docstring)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _unconverted_attention)
    configs = {id(old.config): old.config for _, old, _ in converted if getattr(old, "config", None) is not None}
    for config in configs.values():
        config = _own_config(model, config)  # the caller's config object stays as it was, for other models
        config.use_cache = False
        # save_pretrained writes it into config.json: what convert_attention(model, pretrained=dir) rebuilds
        setattr(config, NSA_CONFIG_KEY, dataclasses.asdict(converted[0][2].config))
        if not skipped:  # unconverted dense layers still need the mask transformers builds for them
            config._attn_implementation = ATTENTION_IMPLEMENTATION
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        # generate() then runs the full forward for each new token: NSA keeps no KV cache (see forward)
        model.generation_config = copy.deepcopy(generation_config)
        model.generation_config.use_cache = False
    for name, _, new in converted:
        base = _base_model(model, name)
        if base is None:
            raise ValueError(f"converted {new.source}, but found no module above it that holds the model's "
                             "rotary embedding (rotary_emb), where position ids become (cos, sin); register "
                             "an adapter for this architecture")
        hook = next(iter(input_hooks(base)), None)
        if hook is None:
            hook = ModelInputs(base)
            base.register_forward_pre_hook(hook, with_kwargs=True)
        hook.dense_layers = sorted({*hook.dense_layers, *(n for n, _ in skipped if n.startswith(_prefix(model, base)))})


def _own_config(model: nn.Module, config):
    """A copy of `config` that every module of `model` holding `config` now holds instead."""
    own = copy.deepcopy(config)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = own
    return own


def _base_model(model: nn.Module, name: str) -> nn.Module | None:
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        candidate = model.get_submodule(".".join(parts[:depth]))
        if isinstance(getattr(candidate, "rotary_emb", None), nn.Module):
            return candidate
    return None


def _prefix(model: nn.Module, base: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is base)
    return f"{name}." if name else ""


def _unconverted_attention(module, *args, **kwargs):
    raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) was left dense, but "
                       f"its config says attn_implementation={ATTENTION_IMPLEMENTATION!r}, which only NSA-converted "
                       "modules serve; convert it with nsa_dist.convert_attention, or set the config's "
                       "_attn_implementation back to 'sdpa'")


def is_converted(model: nn.Module) -> bool:
    """True when `model` holds a Hugging Face model converted by convert_attention."""
    return bool(input_hooks(model))


def supply_global_positions(model: nn.Module, sp: SequenceParallel | None) -> nn.Module:
    """nsa_dist.parallelize's step for a converted HF `model`: its input hook then takes zigzag shards
    (nsa_dist.parallel.shard) over `sp` and hands the rotary embedding each shard's global positions (per
    document with a global `cu_seqlens=`); `sp=None` returns it to one process. Returns `model`."""
    hooks = input_hooks(model)
    if not hooks:
        raise ValueError(f"{type(model).__name__} was not converted by nsa_dist.convert_attention with the "
                         "Hugging Face adapter; convert it first")
    dense = [n for h in hooks for n in h.dense_layers]
    if sp is not None and dense:
        raise ValueError(f"cannot run sequence-parallel: attention left dense by convert_attention(match=...) "
                         f"would see only its shard: {', '.join(dense)}; convert every attention module")
    for hook in hooks:
        hook.sp = sp
    return model


def saved_nsa_config(directory: str | Path) -> NSAConfig:
    """The NSAConfig a converted model was saved with (`save_pretrained` into `directory`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pretrained= takes the directory a converted model was "
                                "saved into (save_pretrained, or python -m nsa_dist.export)")
    values = json.loads(path.read_text()).get(NSA_CONFIG_KEY)
    if values is None:
        raise ValueError(f"{path} has no {NSA_CONFIG_KEY}: that model was saved before convert_attention; convert "
                         "it without pretrained= (its NSA parameters start fresh), or pass the NSAConfig")
    return NSAConfig(**values)


def load_nsa_weights(model: nn.Module, directory: str | Path) -> None:
    """Load the NSA parameters (gates, φ) of a converted `model` from the safetensors files of `directory`,
    where `save_pretrained` of a converted model wrote them beside the rest; every one must be there."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    own = {name for name, module in model.named_modules() if isinstance(module, HFSparseAttention)}
    wanted = {f"{layer}.{name}" for layer in own for name, _ in
              model.get_submodule(layer).named_parameters() if name.startswith(("gate.", "compress_"))}
    found = {}
    for file in files:
        found.update({k: v for k, v in load_file(str(file)).items() if k in wanted})
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{directory} holds no weights for {len(missing)} NSA parameters (e.g. {missing[0]}): it was "
                         "not saved from a converted model; convert without pretrained= to start them fresh")
    model.load_state_dict(found, strict=False)

