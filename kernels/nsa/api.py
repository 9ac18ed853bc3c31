"""Public NSA ops: argument checks, then dispatch to a backend.

Shapes (batch B, queries T, keys Tk, compressed tokens Tc, query heads HQ, key/value heads H,
group size G = HQ / H, head dims D for q/k and Dv for v):

    q      [B, T, HQ, D]        k, v     [B, Tk, H, D], [B, Tk, H, Dv]
    k_cmp  [B, Tc, H, D]        v_cmp    [B, Tc, H, Dv]
    lse    [B, T, HQ]  fp32     idx      [B, T, H, top_n] int32, global block ids, -1 = empty
    gates  [B, T, HQ]

`q_offset` / `k_offset` give the global index of the first query / key when a tensor holds a
slice of the sequence (a sequence-parallel shard, a halo); `cu_seqlens` (`[num_docs + 1]`,
B == 1) packs documents and must reach at least the end of the furthest slice. Positions, documents
and causality all follow from the offsets and `cu_seqlens`; no op needs the length of the whole
sequence. Backends:
"torch" (`naive.py`, fp32, any device), "triton" (CUDA, or `TRITON_INTERPRET=1`), "auto" (triton on
CUDA tensors when Triton is installed, torch otherwise, with a warning on CUDA).

Under `torch.autocast` the ops take their floating inputs at the autocast dtype, as SDPA does (a model
whose RoPE returns fp32 q and k beside bf16 v then runs); outside autocast, inputs of different dtypes
are refused.
"""
from __future__ import annotations

import bisect
import functools
import importlib
import importlib.util
import math
import os
import warnings

import torch

from . import naive
from .layout import num_compressed, token_layout

BACKENDS = ("torch", "triton", "auto")
_TRITON_MODULES = {"compressed_attention": "dense", "window_attention": "dense", "select_blocks": "scoring",
                   "selection_attention": "selection", "gated_sum": "gating"}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    return backend


@functools.cache
def _triton_installed() -> bool:
    """Whether the `triton` package is there at all. Only its absence sends "auto" to the reference: an
    ImportError from inside the kernels is a bug to see, not a reason to run many times slower."""
    if importlib.util.find_spec("triton") is not None:
        return True
    if torch.cuda.is_available():
        warnings.warn("nsa_dist: triton is not installed, so backend='auto' runs the NSA ops on the PyTorch reference "
                      "(fp32, many times slower than the kernels): pip install triton", stacklevel=3)
    return False


def _triton_op(name: str):
    if not _triton_installed():
        return None
    return getattr(importlib.import_module(f".{_TRITON_MODULES[name]}", __package__), name)


def _autocast(*tensors):
    """The floating tensors at the autocast dtype when autocast is on for their device, as they are otherwise."""
    device = next(t.device.type for t in tensors if t is not None)
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _impl(backend: str, device: torch.device, name: str):
    backend = _resolve_backend(backend, device)
    if backend == "torch":
        return _without_autocast(getattr(naive, name), device)
    op = _triton_op(name)
    if op is None:
        raise NotImplementedError(f"{name}: backend='triton' is not available in this install (needs triton "
                                  f"and the Triton kernels); use backend='torch'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{name}: backend='triton' needs CUDA tensors, got tensors on {device}; move them to a "
                         f"GPU, use backend='auto' or 'torch' (the PyTorch reference), or set TRITON_INTERPRET=1 "
                         f"to run the kernels in Triton's (slow) interpreter")
    return _without_autocast(op, device)


def _without_autocast(fn, device: torch.device):
    """`fn` with autocast off: its inputs are cast once at the boundary (`_autocast`), and inside, the
    reference's fp32 math and the kernels' launch code must not be cast again."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return run


def _check_4d(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, T, heads, dim], got {shape}")


def _check_qkv(q, k, v, what="k"):
    _check_4d("q", q)
    _check_4d(what, k)
    _check_4d(what.replace("k", "v"), v)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, {what} {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{what} and its values have different lengths: {k.shape[1]} vs {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"mismatched head counts: {what} has {k.shape[2]} heads, its values {v.shape[2]}; "
                         "keys and values must have the same number of heads")
    HQ, H = q.shape[2], k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"query heads ({HQ}) are not divisible by key/value heads ({H}): GQA needs HQ = G * H")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ between q ({q.shape[-1]}) and {what} ({k.shape[-1]}); "
                         "q and k need the same head dim (v may differ)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, {what} {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"tensors are on different devices: q {q.device}, {what} {k.device}, v {v.device}")


def _check_positions(q, q_offset, k_len, k_offset, cu_seqlens):
    """Offsets and cu_seqlens; returns cu_seqlens as a host list (None without), read once here."""
    if q_offset < 0 or k_offset < 0:
        raise ValueError(f"offsets must be >= 0, got q_offset={q_offset}, k_offset={k_offset}")
    end = max(q_offset + q.shape[1], k_offset + k_len)
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: batch size must be 1, got {q.shape[0]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_docs + 1] starting at 0")
    cu = cu_seqlens.tolist()  # host sync: validation reads the document boundaries once
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu[:8]}...")
    if cu[-1] < end:
        raise ValueError(f"lengths do not match cu_seqlens: the documents add up to {cu[-1]} tokens but the "
                         f"slices passed in reach token {end}; pass the cu_seqlens of the whole (global) sequence")
    return cu


def _check_compressed(q, k_cmp, v_cmp, block_len, stride, q_offset, cu_seqlens):
    _check_qkv(q, k_cmp, v_cmp, what="k_cmp")
    if block_len <= 0 or stride <= 0 or stride > block_len:
        raise ValueError(f"need 0 < stride <= block_len, got block_len={block_len}, stride={stride}")
    if cu_seqlens is None:
        need = num_compressed(q_offset + q.shape[1], block_len, stride)
        if k_cmp.shape[1] < need:
            raise ValueError(f"k_cmp has {k_cmp.shape[1]} compressed tokens but queries up to token "
                             f"{q_offset + q.shape[1]} can see {need}")
    else:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        need = sum(num_compressed(n, block_len, stride) for n in lens)
        if k_cmp.shape[1] != need:
            raise ValueError(f"k_cmp has {k_cmp.shape[1]} compressed tokens but the documents of cu_seqlens "
                             f"have {need} (per document max(0, (len - block_len) // stride + 1))")


def _check_selected_keys(idx, Tk, select_size, q_offset, k_offset, cu_seqlens, cu):
    """Every key a query may take from its selected blocks must lie in k (the Triton kernels would
    skip the others). Those keys lie between the start of the query's document and the query, so
    when k covers that span for every query nothing is read; otherwise idx is."""
    T = idx.shape[1]
    doc_start = 0 if cu is None else cu[bisect.bisect_right(cu, q_offset) - 1]  # of the first query
    if T == 0 or (k_offset <= doc_start and q_offset + T <= k_offset + Tk):
        return
    qlay = token_layout(q_offset, T, cu_seqlens, idx.device)
    pos, start = qlay.pos.view(1, T, 1, 1), qlay.doc_start.view(1, T, 1, 1) - k_offset
    first = idx.long() * select_size  # in-document position of the block's first key
    live = (idx >= 0) & (first <= pos)
    outside = live & ((start + first < 0) | (start + torch.minimum(first + select_size - 1, pos) >= Tk))
    if bool(outside.any()):  # host sync, only when k does not cover every query's past
        raise ValueError(f"selection_attention: a selected block lies outside the keys passed in (k covers global "
                         f"tokens [{k_offset}, {k_offset + Tk})); pass keys that cover every selected block, or "
                         f"set k_offset, or mark the block -1 in idx")


def _scale(scale, q):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def compressed_attention(q, k_cmp, v_cmp, *, block_len: int = 32, stride: int = 16, scale: float | None = None,
                         q_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                         backend: str = "torch"):
    """Attention of each query over the compressed tokens whose whole block lies in its past.

    Compressed token `i` (of the query's document) covers keys `[i*stride, i*stride + block_len)`
    and is visible to the query at position `t` iff `i*stride + block_len - 1 <= t`. A query that
    sees none gets 0 and lse = -inf. Returns `(o [B, T, HQ, Dv], lse [B, T, HQ] fp32)`.
    """
    q, k_cmp, v_cmp = _autocast(q, k_cmp, v_cmp)
    _check_compressed(q, k_cmp, v_cmp, block_len, stride, q_offset, cu_seqlens)
    _check_positions(q, q_offset, 0, 0, cu_seqlens)
    fn = _impl(backend, q.device, "compressed_attention")
    return fn(q, k_cmp, v_cmp, block_len=block_len, stride=stride, scale=_scale(scale, q), q_offset=q_offset,
              cu_seqlens=cu_seqlens)


def select_blocks(q, k_cmp, lse, *, block_len: int = 32, stride: int = 16, select_size: int = 64, top_n: int = 16,
                  num_init: int = 1, num_local: int = 2, scale: float | None = None, q_offset: int = 0,
                  cu_seqlens: torch.Tensor | None = None, backend: str = "torch"):
    """Top-n selection blocks per (query, KV head), shared by the G query heads of the group.

    Block importance = the compression branch's softmax (`exp(q·k_cmp*scale - lse)`), mapped onto
    blocks of `select_size` keys by key overlap (Eq. 9) and summed over the group (Eq. 10). The
    `num_init` first blocks and the `num_local` blocks ending at the query are always chosen; no
    block starting after the query is ever chosen. Returns `idx [B, T, H, top_n]` int32, block
    ids of the query's document ascending, -1 for empty slots. Not differentiable (top-n is
    discrete): gradients reach the compression only through the compressed-attention output.
    """
    q, k_cmp = _autocast(q, k_cmp)
    _check_compressed(q, k_cmp, k_cmp, block_len, stride, q_offset, cu_seqlens)
    _check_positions(q, q_offset, 0, 0, cu_seqlens)
    if select_size <= 0 or select_size % stride:
        raise ValueError(f"select_size (l'={select_size}) must be a positive multiple of the compression stride "
                         f"(d={stride})")
    if top_n < num_init + num_local or num_init < 0 or num_local < 0:
        raise ValueError(f"top_n={top_n} must be at least num_init + num_local = {num_init + num_local}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, T, HQ] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    fn = _impl(backend, q.device, "select_blocks")
    return fn(q.detach(), k_cmp.detach(), lse.detach(), block_len=block_len, stride=stride, select_size=select_size,
              top_n=top_n, num_init=num_init, num_local=num_local, scale=_scale(scale, q), q_offset=q_offset,
              cu_seqlens=cu_seqlens)


def selection_attention(q, k, v, idx, *, select_size: int = 64, scale: float | None = None, q_offset: int = 0,
                        k_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                        backend: str = "torch", return_lse: bool = False):
    """Attention of each query over the keys of its selected blocks (`idx`), causal inside a block.

    Block `b` of the query's document = keys at positions `[b*select_size, (b+1)*select_size)`;
    only keys at positions <= the query's count. `k`/`v` hold global tokens starting at `k_offset`
    and must hold every key the query may take from its selected blocks (else ValueError).
    With `return_lse=True` returns `(o, lse [B, T, HQ] fp32)`, lse differentiable, -inf for a query
    with no key: partial attentions over disjoint key sets then merge exactly (the ring exchange).
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v)
    cu = _check_positions(q, q_offset, k.shape[1], k_offset, cu_seqlens)
    if select_size <= 0:
        raise ValueError(f"select_size must be positive, got {select_size}")
    if idx.dim() != 4 or idx.shape[:3] != (q.shape[0], q.shape[1], k.shape[2]) or idx.dtype.is_floating_point:
        raise ValueError(f"idx must be an integer tensor [B, T, H, top_n] = [{q.shape[0]}, {q.shape[1]}, "
                         f"{k.shape[2]}, n], got {tuple(idx.shape)} {idx.dtype}")
    _check_selected_keys(idx, k.shape[1], select_size, q_offset, k_offset, cu_seqlens, cu)
    fn = _impl(backend, q.device, "selection_attention")
    return fn(q, k, v, idx, select_size=select_size, scale=_scale(scale, q), q_offset=q_offset, k_offset=k_offset,
              cu_seqlens=cu_seqlens, return_lse=return_lse)


def window_attention(q, k, v, *, window: int = 512, scale: float | None = None, q_offset: int = 0,
                     k_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                     backend: str = "torch"):
    """Sliding-window attention: the query at position `t` sees keys at positions `(t - window, t]`
    of its own document. `k`/`v` start at global token `k_offset` and must cover that window."""
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v)
    _check_positions(q, q_offset, k.shape[1], k_offset, cu_seqlens)
    if window <= 0:
        raise ValueError(f"window must be positive, got {window} (to drop the sliding-window branch, pass "
                         "window=0 to nsa_attention / NativeSparseAttention instead)")
    fn = _impl(backend, q.device, "window_attention")
    return fn(q, k, v, window=window, scale=_scale(scale, q), q_offset=q_offset, k_offset=k_offset,
              cu_seqlens=cu_seqlens)


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len: int = 32, stride: int = 16,
                  select_size: int = 64, top_n: int = 16, window: int = 512, num_init: int = 1, num_local: int = 2,
                  scale: float | None = None, q_offset: int = 0, k_offset: int = 0,
                  cu_seqlens: torch.Tensor | None = None, k_slc=None, v_slc=None, k_win=None, v_win=None, backend: str = "torch", return_idx: bool = False):
    """`o = g_cmp * Attn(q, K_cmp, V_cmp) + g_slc * Attn(q, K_slc, V_slc) + g_win * Attn(q, K_win, V_win)`.

    `k`/`v` serve the selection and window branches unless `k_slc`/`v_slc`, `k_win`/`v_win` give
    independent ones. `window=0` drops the sliding-window branch (then `g_win` may be None).
    Gates are `[B, T, HQ]` (already through their sigmoid). Returns `o [B, T, HQ, Dv]`, and the
    selected block ids too with `return_idx=True`.
    """
    k_slc = k if k_slc is None else k_slc
    v_slc = v if v_slc is None else v_slc
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    pos = dict(scale=scale, q_offset=q_offset, cu_seqlens=cu_seqlens, backend=backend)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc)) + ((("g_win", g_win),) if window else ()):
        if g is None or g.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, HQ] = {tuple(q.shape[:3])}, got "
                             f"{None if g is None else tuple(g.shape)}")
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, block_len=block_len, stride=stride, **pos)
    idx = select_blocks(q, k_cmp, lse, block_len=block_len, stride=stride, select_size=select_size, top_n=top_n,
                        num_init=num_init, num_local=num_local, **pos)
    outs = [o_cmp, selection_attention(q, k_slc, v_slc, idx, select_size=select_size, k_offset=k_offset, **pos)]
    gates = [g_cmp, g_slc]
    if window:
        outs.append(window_attention(q, k_win, v_win, window=window, k_offset=k_offset, **pos))
        gates.append(g_win)
    o = gated_sum(outs, gates, backend=backend)
    return (o, idx) if return_idx else o


def gated_sum(outputs, gates, *, backend: str = "torch"):
    """`o = sum_b gates[b] * outputs[b]`: the branches' outputs `[B, T, HQ, Dv]` weighted by their gates
    `[B, T, HQ]` (two or three branches, same shapes and dtype)."""
    if len(outputs) != len(gates) or len(outputs) not in (2, 3):
        raise ValueError(f"gated_sum takes two or three (output, gate) pairs, got {len(outputs)} outputs and "
                         f"{len(gates)} gates")
    outputs, gates = _autocast(*outputs), _autocast(*gates)
    for o, g in zip(outputs, gates):
        if o.shape != outputs[0].shape or g.shape != o.shape[:3] or o.dtype != outputs[0].dtype:
            raise ValueError(f"gated_sum: outputs must share one shape and dtype, gates be [B, T, HQ]; got "
                             f"{[tuple(x.shape) for x in outputs]} and {[tuple(x.shape) for x in gates]}")
    if _resolve_backend(backend, outputs[0].device) == "triton":
        return _impl("triton", outputs[0].device, "gated_sum")(outputs, gates)
    o = gates[0].unsqueeze(-1) * outputs[0]
    for out, g in zip(outputs[1:], gates[1:]):
        o = o + g.unsqueeze(-1) * out
    return o
