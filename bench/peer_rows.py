"""The public NSA kernels as rows of bench/kernels.py, called on the same inputs as nsa_dist's.

`--peers DIR` points at a staged copy of their code (../shared/peers/stage.sh writes `.peers/`):
  DIR/mdy666/flash_nsa   mdy666's Scalable-Flash-Native-Sparse-Attention: selected attention
                         (`select_attn`) and the whole NSA core (`NSACore`), any GQA group
  DIR/fsa/fsa            FSA (Flash Sparse Attention): KV-block-outer selected attention
  DIR/fsa/nsa_ref        XunhaoLai's NSA kernels, which FSA's core uses for compression and top-n
Their code is imported from DIR, never copied into this project. A peer that does not import is
reported once and its rows are skipped.

Layouts: both take `[T, heads, D]` (one packed sequence, `cu_seqlens`) and block ids `[H, T, n]`;
mdy666 marks an empty slot with the number of blocks where nsa_dist writes -1. Both call flash-attn
for the sliding window; where it is missing (it has no wheel for every GPU image) their window runs
on nsa_dist's `window_attention`, and the row's note says so.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import torch

L, STRIDE, SEL, TOPN, WIN = 32, 16, 64, 16, 512
_loaded: dict = {}


def _import_mdy(root):
    try:
        import pkg_resources  # noqa: F401  (flash_nsa/utils.py reads parse_version from it)
    except ImportError:
        from packaging.version import parse
        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)
    # its package __init__s import Megatron layers and the Hugging Face module (pandas); load the modules
    # needed under empty parents instead
    for name, sub in (("flash_nsa", ""), ("flash_nsa.modules", "modules")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, "mdy666", "flash_nsa", sub)]
        sys.modules[name] = pkg
    meg = importlib.import_module("flash_nsa.modules.megatron_level_nsa")
    return dict(select=importlib.import_module("flash_nsa.ops.select_attn").select_attn, meg=meg,
                config=importlib.import_module("flash_nsa.config").NSAConfig,
                helper=importlib.import_module("flash_nsa.utils").NSAHelper)


def _import_fsa(root):
    sys.path.insert(0, os.path.join(root, "fsa"))
    return dict(select=importlib.import_module("fsa.ops.FSA_topk_sparse_attention").FSA_topk_sparse_attention,
                topk=importlib.import_module("nsa_ref.ops.topk_sparse_attention").topk_sparse_attention,
                cmp=importlib.import_module("nsa_ref.ops.compressed_attention").compressed_attention,
                pool=importlib.import_module("nsa_ref.ops.weighted_pool").avgpool_compress)


def load(root) -> dict:
    """{'mdy666': module dict or an error line, 'fsa': ...}, imported once per process."""
    if not _loaded:
        for name, fn in (("mdy666", _import_mdy), ("fsa", _import_fsa)):
            try:
                _loaded[name] = fn(os.path.abspath(root))
            except Exception as e:  # noqa: BLE001  (a peer that fails to import is a skipped row, not a failed run)
                _loaded[name] = f"import failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return _loaded


def _need(root, name):
    m = load(root)[name]
    if isinstance(m, str):
        raise RuntimeError(f"{name}: {m}")
    return m


def _window(q, k, v):
    from nsa_dist.kernels import window_attention
    return window_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), window=WIN, backend="triton")[0]


def _has_flash_attn():
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def _mdy_window_on_ours(meg):
    """mdy666's NSACore calls flash-attn's window through `swa_fwd` / `swa_bwd`: route them to
    nsa_dist's window kernel (through autograd, keeping its graph between the two calls)."""
    saved = {}

    def fwd(q, k, v, sm_scale=None, out=None, helper=None):
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            o = _window(qq, kk, vv)
        saved["graph"] = (o, qq, kk, vv)
        return o.detach(), torch.zeros(1, device=q.device)

    def bwd(q, k, v, out, lse, dout, sm_scale=None, helper=None):
        o, qq, kk, vv = saved.pop("graph")
        return tuple(g.contiguous() for g in torch.autograd.grad(o, (qq, kk, vv), dout))

    meg.swa_fwd, meg.swa_bwd = fwd, bwd


def _packed(q, k, v):
    """`[1, T, heads, D]` -> `[T, heads, D]` views that keep the leaves' gradients."""
    return q[0], k[0], v[0]


def selection_case(root, peer, q, k, v, idx):
    """fwd() of a peer's selected attention on nsa_dist's inputs (`idx [1, T, H, n]`, -1 = empty)."""
    T = q.shape[1]
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    ids = idx[0].permute(1, 0, 2).contiguous()  # (H, T, n)
    if peer == "mdy666":
        m = _need(root, peer)
        m["helper"].set_hyperparameters(kernel_size=L, stride=STRIDE, block_size=SEL, window_size=WIN, top_n=TOPN)
        m["helper"].init_cu_seqlens(cu)
        nb = -(-T // SEL)
        ids = torch.where(ids < 0, torch.full_like(ids, nb), ids)
        return lambda: m["select"](*_packed(q, k, v), ids).unsqueeze(0), ""
    if peer == "fsa":
        f = _need(root, peer)["select"]
        return lambda: f(*_packed(q, k, v), ids, SEL, cu, None).unsqueeze(0), ""
    raise ValueError(peer)


def core_case(root, peer, q, k, v, weights):
    """fwd() of a peer's whole NSA core (mean compression, l=32, d=16, l'=64, n=16, w=512) from the
    post-projection q, k, v `[1, T, heads, D]`; `weights [1, T, HQ, 3]` are its branch gates' logits."""
    T, HQ, D = q.shape[1:]
    H = k.shape[2]
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    note = "" if _has_flash_attn() else "window on nsa_dist's kernel (no flash-attn)"
    if peer == "mdy666":
        m = _need(root, peer)
        if not _has_flash_attn():
            _mdy_window_on_ours(m["meg"])
        cfg = m["config"](head_dim=D, num_heads=HQ, num_kv_heads=H, kernel_size=L, stride=STRIDE, cmp_k_method="mean",
                          cmp_v_method="mean", block_size=SEL, top_n=TOPN, num_init_blocks=1, num_local_blocks=2,
                          window_size=WIN)
        core = m["meg"].NSACore(cfg, process_group=None, pp_size=1)
        return lambda: core(*_packed(q, k, v), weights[0], cu).view(1, T, HQ, -1), note
    if peer == "fsa":
        r = _need(root, peer)
        select = r["select"] if HQ // H <= 8 else r["topk"]  # FSA's own module falls back to nsa_ref at G > 8
        window = _window
        if _has_flash_attn():
            from flash_attn import flash_attn_func

            def window(q_, k_, v_):
                return flash_attn_func(q_.unsqueeze(0), k_.unsqueeze(0), v_.unsqueeze(0), causal=True,
                                       window_size=(WIN - 1, 0))[0]

        def fwd():
            qq, kk, vv = _packed(q, k, v)
            ck, ccu = r["pool"](kk, None, cu, L, STRIDE)
            cv, _ = r["pool"](vv, None, cu, L, STRIDE)
            o_cmp, topk = r["cmp"](qq, ck, cv, L, STRIDE, SEL, TOPN, cu, ccu, T, (T - L) // STRIDE + 1, None, 1, 2,
                                   parallel_topk_compute=False)
            o_slc = select(qq, kk, vv, topk, SEL, cu, None)
            gate = torch.sigmoid(weights[0])
            o = gate[..., 0:1] * o_cmp + gate[..., 1:2] * o_slc + gate[..., 2:3] * window(qq, kk, vv)
            return o.unsqueeze(0)
        return fwd, note
    raise ValueError(peer)
