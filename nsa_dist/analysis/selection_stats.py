"""What the NSA layers of a model select and how they weigh their branches, recorded by hooks.

`SelectionRecorder` registers a forward pre-hook on every `SparseAttention` of a model (the layers
are not changed) and a forward hook on each layer's `gate`. The pre-hook recomputes the layer's
top-n block ids from its own projections, φ and the public ops (the same calls `nsa_forward` makes
on one rank), and the compression-branch probability mass that falls on the blocks every query is
forced to take (the initial and local ones); the gate hook keeps the sigmoid of the gate logits.
Recording covers whole sequences on one device (no sequence parallelism, no packed documents).

The statistics below read those records against the positions each answer copies
(`nsa_dist.data.tasks` `sample_with_sources`):

    needle_hits          for every answer and KV head: is the block holding the answer's source among
                         the blocks its query selected
    distinct_free_blocks how many different blocks the router picks, beyond the forced ones, over a
                         window of queries: a router that ignores its input picks the same few
    gate means           the mean of each branch's gate (compressed, selected, window)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nsa_dist.kernels import compressed_attention, compression_blocks, select_blocks
from nsa_dist.nn.layer import SparseAttention

BRANCHES = ("compressed", "selected", "window")

# Query rows per chunk when scoring compressed tokens, so long sequences stay within memory.
_SCORE_ELEMENTS = 1 << 24


@dataclass
class LayerSelection:
    """One NSA layer's record of one forward call."""

    idx: torch.Tensor  # [B, T, H, top_n] selected block ids, ascending, -1 for empty slots
    forced_mass: torch.Tensor  # [B, T] share of the compressed-branch probability on forced blocks (nan: none seen)
    gates: torch.Tensor | None  # [B, T, branches, HQ] after the sigmoid
    select_size: int
    num_init: int
    num_local: int


def forced_block_mask(positions: torch.Tensor, num_blocks: int, select_size: int, num_init: int,
                      num_local: int) -> torch.Tensor:
    """`[len(positions), num_blocks]`: the blocks a query at each position takes whatever it scores."""
    blocks = torch.arange(num_blocks, device=positions.device)[None, :]
    own = (positions // select_size)[:, None]
    return (blocks < num_init) | ((own - blocks >= 0) & (own - blocks < num_local))


def _forced_mass(q, k_cmp, lse, config) -> torch.Tensor:
    """Per query, the share of its compressed-attention probability (summed over its heads) on compressed
    tokens whose last key lies in a block the query is forced to take; nan where it sees none."""
    B, T, HQ, D = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    c = config
    positions = torch.arange(T, device=q.device)
    last_key = torch.arange(Tc, device=q.device) * c.stride + c.block_len - 1
    key_block = last_key // c.select_size
    kf = k_cmp.float()
    rows = max(1, _SCORE_ELEMENTS // max(1, B * HQ * Tc))
    out = []
    for s in range(0, T, rows):
        qc = q[:, s:s + rows].float().unflatten(2, (H, HQ // H))
        scores = torch.einsum("bthgd,bkhd->bthgk", qc, kf) / math.sqrt(D)
        l = lse[:, s:s + rows].float().unflatten(2, (H, HQ // H))[..., None]
        p = torch.exp(scores - torch.where(torch.isfinite(l), l, torch.zeros_like(l)))
        pos = positions[s:s + rows, None]
        visible = last_key[None, :] <= pos
        own = pos // c.select_size
        forced = (key_block[None, :] < c.num_init) | (own - key_block[None, :] < c.num_local)
        total = (p * visible[None, :, None, None]).sum((2, 3, 4))
        on_forced = (p * (visible & forced)[None, :, None, None]).sum((2, 3, 4))
        out.append(torch.where(total > 0, on_forced / total.clamp_min(1e-30), torch.full_like(total, math.nan)))
    return torch.cat(out, 1)


class SelectionRecorder:
    """`with SelectionRecorder(model) as rec: model(tokens)` leaves one `LayerSelection` per NSA layer
    call in `rec.layers`, in call order."""

    def __init__(self, model: torch.nn.Module, *, gates: bool = True, forced_mass: bool = True):
        self.model = model
        self.record_gates = gates
        self.record_mass = forced_mass
        self.layers: list[LayerSelection] = []
        self._hooks = []

    def __enter__(self) -> "SelectionRecorder":
        for layer in self.model.modules():
            if isinstance(layer, SparseAttention):
                self._hooks.append(layer.register_forward_pre_hook(self._record_selection, with_kwargs=True))
                if self.record_gates:
                    self._hooks.append(layer.gate.register_forward_hook(self._gate_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _record_selection(self, layer: SparseAttention, args, kwargs) -> None:
        if layer.sp is not None or kwargs.get("cu_seqlens") is not None:
            raise ValueError("selection statistics read whole sequences: record on a model that is not parallelized, "
                             "called without cu_seqlens")
        c = layer.config
        with torch.no_grad():
            x, q, k, v = args[:4]  # the layer input and its projected, rotated q, k, v
            if isinstance(k, (tuple, list)):  # separate_kv: the compression set scores the blocks
                k, v = k[0], v[0]
            k_cmp = layer.compress_k(compression_blocks(k, c.block_len, c.stride))
            v_cmp = layer.compress_v(compression_blocks(v, c.block_len, c.stride))
            _, lse = compressed_attention(q, k_cmp, v_cmp, block_len=c.block_len, stride=c.stride, backend=c.backend)
            idx = select_blocks(q, k_cmp, lse, block_len=c.block_len, stride=c.stride, select_size=c.select_size,
                                top_n=c.top_n, num_init=c.num_init, num_local=c.num_local, backend=c.backend)
            mass = _forced_mass(q, k_cmp, lse, c) if self.record_mass else torch.full(x.shape[:2], math.nan)
        self.layers.append(LayerSelection(idx=idx, forced_mass=mass, gates=None, select_size=c.select_size,
                                          num_init=c.num_init, num_local=c.num_local))

    def _gate_hook(self, layer: SparseAttention):
        def hook(module, args, output):
            B, T, _ = output.shape
            # the gate module runs after the layer's pre-hook, so the layer's record is the last one
            self.layers[-1].gates = torch.sigmoid(output.detach().float()).view(B, T, layer.num_branches,
                                                                                layer.num_heads)

        return hook


def selected_blocks_per_layer(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each NSA layer's `idx [B, N, H, n]` for `model(tokens)`."""
    with SelectionRecorder(model, gates=False, forced_mass=False) as recorder, torch.no_grad():
        model(tokens)
    return [layer.idx for layer in recorder.layers]


def needle_hits(record: LayerSelection, sources: torch.Tensor, answer_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """For every answer (in `answer_mask.nonzero()` order) and KV head: `hit`, whether the block of the
    answer's source position was selected by the answer's query, and `forced`, whether the query takes
    that block whatever it scores (then the hit says nothing about the router). Both `[answers, H]`."""
    b, t = answer_mask.nonzero(as_tuple=True)
    src = sources[b, t].to(record.idx.device)
    chosen = record.idx[b, t].long()  # (A, H, n)
    block = (src // record.select_size)[:, None]
    hit = (chosen == block[..., None]).any(-1)
    own = (t.to(src.device) // record.select_size)[:, None]
    forced = (block < record.num_init) | ((own - block >= 0) & (own - block < record.num_local))
    return {"hit": hit, "forced": forced.expand_as(hit)}


def distinct_free_blocks(record: LayerSelection, query_window: int) -> dict[str, float]:
    """Over the last `query_window` queries of each sequence, per (sequence, KV head): how many different
    blocks fill the slots that are not forced, the mean of that count, and its share of the blocks that
    were free to pick for some query of the window."""
    idx = record.idx
    B, T, H, n = idx.shape
    W = min(query_window, T)
    positions = torch.arange(T - W, T, device=idx.device)
    num_blocks = -(-T // record.select_size)
    forced = forced_block_mask(positions, num_blocks, record.select_size, record.num_init, record.num_local)
    window = idx[:, T - W:].long()  # (B, W, H, n)
    used = torch.zeros(B, H, num_blocks, dtype=torch.bool, device=idx.device)
    valid = window >= 0
    free = valid & ~forced[None, :, None, :].expand(B, W, H, num_blocks).gather(-1, window.clamp_min(0))
    b, w, h, s = free.nonzero(as_tuple=True)
    used[b, h, window[b, w, h, s]] = True
    count = used.sum(-1).float()  # (B, H)
    causal = torch.arange(num_blocks, device=idx.device)[None, :] * record.select_size <= positions[:, None]
    candidates = int((causal & ~forced).any(0).sum())
    mean = float(count.mean())
    return {"distinct_free_blocks": mean, "distinct_free_fraction": mean / candidates if candidates else math.nan}


def mean_forced_mass(record: LayerSelection, query_window: int) -> float:
    """The mean share of the router's probability on forced blocks over the last `query_window` queries,
    among queries that have a block to choose beyond the forced ones: near 1 is a collapsed router."""
    T = record.forced_mass.shape[1]
    W = min(query_window, T)
    positions = torch.arange(T - W, T, device=record.forced_mass.device)
    has_free = positions // record.select_size >= record.num_init + record.num_local
    mass = record.forced_mass[:, T - W:][:, has_free.to(record.forced_mass.device)]
    mass = mass[~torch.isnan(mass)]
    return float(mass.mean()) if mass.numel() else math.nan


def gate_means(record: LayerSelection) -> dict[str, float]:
    """The mean gate of each branch over every token and query head."""
    if record.gates is None:
        return {}
    means = record.gates.mean((0, 1, 3))
    return {name: float(m) for name, m in zip(BRANCHES, means)}
