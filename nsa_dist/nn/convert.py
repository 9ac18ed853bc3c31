"""`convert_attention(model, nsa)`: swap each attention module of a model for NSA, in place.

Adapters recognise attention modules and build their NSA replacement. They are asked in order, the
most recently registered first; the first that claims a module replaces it, and nothing inside a
claimed module is looked at again. Built in:

- "nsa_dist": this project's NSA layers (`SparseAttention`, hence `NativeSparseAttention` and every
  converted module). They are NSA already, so they stay as they are: `convert_attention` on an
  `NSATransformer` returns it unchanged. Its NSAConfig is fixed at construction (φ's parameter shapes
  follow `block_len`), so asking for a different one raises instead of silently keeping the old one.
- "huggingface-llama": Hugging Face Llama-family attention (Llama, Mistral, Qwen2, Qwen3 and whatever
  else has separate q/k/v/o projections and receives `position_embeddings`); see nsa_dist.nn.hf.

A new architecture comes in through `register_adapter(name, finds=..., replace=...)`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from nsa_dist.nn.layer import NSAConfig, SparseAttention

GATE_INITS = ("preserve", "uniform")
# Sparse-branch gates at sigmoid(-10) = 4.5e-5 and the window gate at sigmoid(10) = 1 - 4.5e-5: on tiny
# random Llama models (init std 0.1) the short-sequence logits then differ by 5e-5 relative, against
# 4e-4 at (-8, -8, 8) and 1.4e-2 at (-5, -5, 10); a margin of 20x under the 1e-3 the conversion promises.
PRESERVE_BIASES = (-10.0, -10.0, 10.0)


@dataclass(frozen=True)
class GateInit:
    """How a converted layer's branch gates `sigmoid(W x + b)` start: `W = 0`, `b` per branch
    (compressed, selected, window), so every head starts with the same input-independent gates."""

    biases: tuple[float, float, float]

    @classmethod
    def resolve(cls, spec: str | tuple[float, float, float] | GateInit) -> GateInit:
        if isinstance(spec, GateInit):
            return spec
        if spec == "preserve":
            return cls(PRESERVE_BIASES)
        if spec == "uniform":
            return cls((0.0, 0.0, 0.0))
        if isinstance(spec, (tuple, list)) and len(spec) == 3 and all(math.isfinite(float(b)) for b in spec):
            return cls(tuple(float(b) for b in spec))
        raise ValueError(f"gate_init={spec!r}: choose one of {GATE_INITS} or give three finite biases "
                         "(compressed, selected, window)")

    @property
    def preserves(self) -> bool:
        """True when the window branch dominates, so short sequences see the original attention."""
        return self.biases[2] > 0 > max(self.biases[:2])


@dataclass(frozen=True)
class Adapter:
    """Recognises attention modules of one architecture and builds their NSA replacements.

    `finds(module) -> bool`: is this an attention module the adapter replaces?
    `replace(name, module, nsa, gate_init) -> nn.Module`: the replacement (or `module` itself to keep
    it); `nsa` is the caller's NSAConfig or None, `gate_init` a GateInit. Raise to refuse, naming the
    module and what the user can do.
    `finish(model, converted, skipped)`: optional model-level changes once every module is replaced;
    `converted` lists `(name, old, new)`, `skipped` the `(name, module)` pairs it found that `match`
    left out.
    """

    name: str
    finds: Callable[[nn.Module], bool]
    replace: Callable[[str, nn.Module, NSAConfig | None, GateInit], nn.Module]
    finish: Callable[[nn.Module, list, list], None] | None = None


_adapters: list[Adapter] = []


def register_adapter(name: str, *, finds: Callable[[nn.Module], bool],
                     replace: Callable[[str, nn.Module, NSAConfig | None, GateInit], nn.Module],
                     finish: Callable[[nn.Module, list, list], None] | None = None) -> Adapter:
    """Teach `convert_attention` another architecture (see `Adapter` for the three callables).

    The adapter is asked before those registered earlier, so it can take over modules a built-in one
    would claim; registering a name again replaces that adapter. Returns the adapter.

        register_adapter("my-model", finds=lambda m: isinstance(m, MyAttention),
                         replace=lambda name, m, nsa, gates: MyNSAAttention.from_dense(m, nsa, gates))
    """
    adapter = Adapter(name, finds, replace, finish)
    _adapters[:] = [adapter] + [a for a in _adapters if a.name != name]
    return adapter


def registered_adapters() -> list[Adapter]:
    """The adapters in the order they are asked."""
    return list(_adapters)


def convert_attention(model: nn.Module, nsa: NSAConfig | None = None, *,
                      match: str | Callable[[str, nn.Module], bool] | None = None,
                      gate_init: str | tuple[float, float, float] | GateInit = "preserve",
                      pretrained: str | os.PathLike | None = None) -> nn.Module:
    """Replace every attention module of `model` that an adapter recognises with NSA, in place.

    The replacement keeps the module's projections (same parameter names, so pretrained state dicts
    still load) and the model's rotary embedding, and adds φ for K and V and the branch gates.
    `nsa`: the NSA knobs (None: the paper's defaults, `NSAConfig()`). `match`: convert only the modules
    whose name matches (a regular expression searched in the dotted module name, or a predicate
    `(name, module) -> bool`).

    `gate_init` sets where the gates start (weights 0, so each gate is `sigmoid(bias)`):
    - "preserve" (default): compressed and selected gates at sigmoid(-10) = 4.5e-5, window gate at
      sigmoid(10). On sequences no longer than the window, where the window branch is full causal
      attention, the converted model computes what it computed before (logits within ~1e-4
      relative). The price is learning speed: the sparse branches' outputs, and so every gradient
      that reaches φ and the q/k/v projections through them, are scaled by sigmoid(-10) = 4.5e-5, and
      the gate biases' own gradients by sigmoid'(-10) = 4.5e-5. Adam rescales per parameter, so the
      gate biases still climb by about the learning rate per step (from -10 to 0 in ~10/lr steps) and
      φ still learns, but the shared q/k/v projections hear the sparse branches only as loudly as
      their gates until the gates open; under SGD the sparse branches learn ~20000x more slowly.
      (-8, -8, 8) trades a ~4e-4 start for 7x larger sparse gradients.
    - "uniform": every gate at 0.5; the model starts away from what it was (the window branch's
      output is halved and the sparse ones added), and every branch learns at full speed.
    - three biases `(compressed, selected, window)`: anything in between.

    `pretrained`: the directory a converted Hugging Face model was saved into (`save_pretrained`, or
    `python -m nsa_dist.export`), which `from_pretrained` has just loaded the rest from: its NSAConfig
    (unless `nsa` is given) and its trained gates and φ come back, so the model computes what it
    computed when saved.

    Raises ValueError when nothing in `model` is an attention module an adapter knows, listing the
    module types it saw; adapters raise for attention they cannot map. Returns `model` (or the
    replacement when `model` itself is an attention module).
    """
    gates = GateInit.resolve(gate_init)
    if pretrained is not None and nsa is None:
        from nsa_dist.nn import hf

        nsa = hf.saved_nsa_config(pretrained)
    selected = _name_filter(match)
    found: list[tuple[str, nn.Module, Adapter]] = []
    skipped: dict[str, list] = {}
    claimed_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in claimed_prefixes):
            continue
        adapter = next((a for a in _adapters if a.finds(module)), None)
        if adapter is None:
            continue
        claimed_prefixes.append(name)
        if selected(name, module):
            found.append((name, module, adapter))
        else:
            skipped.setdefault(adapter.name, []).append((name, module))
    if not found:
        seen = sorted({type(m).__name__ for m in model.modules()})
        what = "matched" if skipped else "found"
        raise ValueError(f"convert_attention {what} no attention module to convert in {type(model).__name__} "
                         f"(match={match!r}); module types seen: {', '.join(seen)}. Known adapters: "
                         f"{', '.join(a.name for a in _adapters)}; teach it another architecture with "
                         "nsa_dist.register_adapter")

    converted: dict[str, list] = {}
    for name, module, adapter in found:
        new = adapter.replace(name, module, nsa, gates)
        if new is not module:
            if not name:
                model = new
            else:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, new)
        converted.setdefault(adapter.name, []).append((name, module, new))
    for adapter in _adapters:
        if adapter.finish is not None and adapter.name in converted:
            adapter.finish(model, converted[adapter.name], skipped.get(adapter.name, []))
    if pretrained is not None:
        from nsa_dist.nn import hf

        hf.load_nsa_weights(model, pretrained)
    return model


def _name_filter(match) -> Callable[[str, nn.Module], bool]:
    if match is None:
        return lambda name, module: True
    if isinstance(match, str):
        pattern = re.compile(match)
        return lambda name, module: pattern.search(name) is not None
    if callable(match):
        return match
    raise TypeError(f"match must be a regular expression, a callable (name, module) -> bool or None, got "
                    f"{type(match).__name__}")


def _keep_nsa_layer(name: str, module: SparseAttention, nsa: NSAConfig | None, gates: GateInit) -> nn.Module:
    if nsa is not None and nsa != module.config:
        raise ValueError(f"{name or 'the model'} ({type(module).__name__}) is NSA already, built with {module.config}; "
                         f"convert_attention does not rebuild it with {nsa} (φ's shapes and the trained gates "
                         "follow its config). Build the model with the NSAConfig you want, or pass nsa=None")
    return module


def _register_builtin_adapters():
    from nsa_dist.nn import hf

    register_adapter("huggingface-llama", finds=hf.is_llama_attention, replace=hf.convert_llama_attention,
                     finish=hf.finish_conversion)
    register_adapter("nsa_dist", finds=lambda m: isinstance(m, SparseAttention), replace=_keep_nsa_layer)


_register_builtin_adapters()
