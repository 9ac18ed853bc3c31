"""Triton backend vs the fp32 torch reference, on CPU through Triton's interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before `triton.jit` decorates the kernels,
and another test may already have imported them in this process. So, unless the variable was
set when pytest started, the one collected test runs this file again in a subprocess with it
set. Sizes are tiny and odd (the interpreter runs every program in Python).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETING:

    def test_triton_kernels_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

else:
    from nsa_dist.kernels.nsa import api, naive, tuning
    from nsa_dist.kernels.nsa.layout import num_compressed, token_layout

    TOL = 1e-5  # fp32 on both sides; the interpreter's dots are fp32

    def rel(out, ref):
        out, ref = out.double(), ref.double()
        assert torch.isfinite(out).all(), "non-finite values (an unwritten NaN-poisoned element?)"
        return ((out - ref).norm() / ref.norm()).item()

    def n_compressed(T, q_offset, cu, block_len, stride):
        if cu is None:
            return num_compressed(q_offset + T, block_len, stride)
        return sum(num_compressed(int(n), block_len, stride) for n in (cu[1:] - cu[:-1]))

    def check_lse(lse, ref):
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        assert torch.isfinite(lse[fin]).all()
        assert (lse[fin] - ref[fin]).abs().max().item() < 1e-4

    def grads(out, inputs, weight, extra=None):
        loss = (out.float() * weight).sum()
        if extra is not None:
            lse, wl = extra
            loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * wl).sum()
        return torch.autograd.grad(loss, inputs)

    CU = torch.tensor([0, 20, 21, 67])

    @pytest.mark.parametrize("B,T,HQ,H,D,DV,l,d,q_offset,cu", [
        (2, 67, 4, 4, 16, 32, 8, 4, 0, None),      # G = 1
        (1, 67, 4, 2, 48, 24, 8, 4, 5, None),      # G = 2, head dims not powers of two
        (1, 67, 16, 4, 16, 16, 16, 8, 0, CU),      # G = 4, packed documents
        (1, 191, 16, 1, 16, 16, 32, 16, 0, None),  # G = 16, the paper's l and d
    ])
    def test_compressed_attention(B, T, HQ, H, D, DV, l, d, q_offset, cu):
        torch.manual_seed(T + HQ)
        Tc = n_compressed(T, q_offset, cu, l, d)
        q = torch.randn(B, T, HQ, D, requires_grad=True)
        k = torch.randn(B, Tc, H, D, requires_grad=True)
        v = torch.randn(B, Tc, H, DV, requires_grad=True)
        kw = dict(block_len=l, stride=d, q_offset=q_offset, cu_seqlens=cu)
        o_ref, lse_ref = api.compressed_attention(q, k, v, backend="torch", **kw)
        o, lse = api.compressed_attention(q, k, v, backend="triton", **kw)
        assert rel(o, o_ref) < TOL
        check_lse(lse, lse_ref)
        assert torch.isneginf(lse_ref).any(), "the case should include queries that see no compressed token"
        w, wl = torch.randn_like(o_ref), torch.randn_like(lse_ref)
        for a, b in zip(grads(o, (q, k, v), w, (lse, wl)), grads(o_ref, (q, k, v), w, (lse_ref, wl))):
            assert rel(a, b) < TOL

    @pytest.mark.parametrize("B,T,HQ,H,D,DV,window,q_offset,k_offset,cu", [
        (2, 67, 2, 2, 16, 32, 13, 0, 0, None),
        (1, 67, 4, 2, 32, 16, 16, 30, 15, None),   # a shard with its halo of window - 1 keys
        (1, 67, 16, 4, 16, 16, 9, 0, 0, CU),
        (1, 67, 16, 1, 16, 16, 100, 0, 0, None),   # window longer than the sequence
    ])
    def test_window_attention(B, T, HQ, H, D, DV, window, q_offset, k_offset, cu):
        torch.manual_seed(T + window)
        Tk = q_offset + T - k_offset
        q = torch.randn(B, T, HQ, D, requires_grad=True)
        k = torch.randn(B, Tk, H, D, requires_grad=True)
        v = torch.randn(B, Tk, H, DV, requires_grad=True)
        kw = dict(window=window, q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu)
        o_ref = api.window_attention(q, k, v, backend="torch", **kw)
        o = api.window_attention(q, k, v, backend="triton", **kw)
        assert rel(o, o_ref) < TOL
        w = torch.randn_like(o_ref)
        for a, b in zip(grads(o, (q, k, v), w), grads(o_ref, (q, k, v), w)):
            assert rel(a, b) < TOL

    @pytest.mark.parametrize("rows_major", [True, False])
    def test_dense_backward_loop_forms(rows_major, monkeypatch):
        """Both forms of the dK/dV loop (rows x keys and keys x rows) give the reference's gradients."""
        torch.manual_seed(3)
        q = torch.randn(1, 67, 8, 16, requires_grad=True)
        k = torch.randn(1, 67, 2, 16, requires_grad=True)
        v = torch.randn(1, 67, 2, 24, requires_grad=True)
        w = torch.randn(1, 67, 8, 24)
        with tuning.override(dense_dkdv=tuning.table(q.device).dense_dkdv._replace(rows_major=rows_major)):
            outs = [api.window_attention(q, k, v, window=20, backend=b) for b in ("triton", "torch")]
        for a, b in zip(grads(outs[0], (q, k, v), w), grads(outs[1], (q, k, v), w)):
            assert rel(a, b) < TOL

    def test_window_attention_missing_halo_raises():
        q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
        with pytest.raises(ValueError, match="halo"):
            api.window_attention(q, k, k, window=4, q_offset=8, k_offset=8, backend="triton")

    @pytest.mark.parametrize("B,T,HQ,H,D,l,d,sel,top_n,n_init,n_local,q_offset,cu", [
        (2, 67, 4, 4, 16, 8, 4, 16, 4, 1, 2, 0, None),      # G = 1
        (1, 67, 4, 2, 32, 8, 4, 16, 5, 1, 2, 7, None),      # G = 2, offset queries
        (1, 67, 16, 4, 16, 8, 4, 8, 3, 1, 2, 0, CU),        # G = 4, packed documents
        (1, 191, 32, 2, 16, 32, 16, 64, 3, 1, 2, 0, None),  # G = 16, the paper's l, d, l'
        (1, 191, 4, 1, 16, 16, 16, 16, 6, 0, 1, 0, None),   # l = d = l', no initial block
        (1, 67, 2, 1, 16, 8, 4, 16, 16, 1, 2, 0, None),     # top_n beyond the blocks there are: -1 slots
        (1, 400, 8, 2, 16, 8, 4, 16, 6, 1, 2, 5, None),     # long: chunks every row sees skip the mask
        (1, 400, 4, 4, 16, 8, 4, 16, 6, 2, 3, 0, torch.tensor([0, 150, 151, 400])),  # ... inside documents
    ])
    def test_select_blocks(B, T, HQ, H, D, l, d, sel, top_n, n_init, n_local, q_offset, cu):
        torch.manual_seed(T + HQ + top_n)
        Tc = n_compressed(T, q_offset, cu, l, d)
        q, k = torch.randn(B, T, HQ, D), torch.randn(B, Tc, H, D)
        _, lse = api.compressed_attention(q, k, k, block_len=l, stride=d, q_offset=q_offset, cu_seqlens=cu)
        kw = dict(block_len=l, stride=d, select_size=sel, top_n=top_n, num_init=n_init, num_local=n_local,
                  q_offset=q_offset, cu_seqlens=cu)
        ref = api.select_blocks(q, k, lse, backend="torch", **kw)
        out = api.select_blocks(q, k, lse, backend="triton", **kw)
        assert out.dtype == torch.int32 and out.shape == ref.shape
        assert torch.equal(out, ref)

    @pytest.mark.parametrize("B,T,HQ,H,l,d,sel,top_n,q_offset,cu,scratch", [
        (2, 150, 4, 2, 8, 4, 8, 5, 3, None, 2 * 2 * 32 * 4 * 8),       # query chunks of 8, batch 2
        (1, 150, 8, 2, 16, 8, 16, 4, 0, torch.tensor([0, 37, 38, 150]), 2 * 16 * 4 * 16),  # chunks x documents
        (3, 100, 2, 2, 8, 8, 8, 20, 0, None, None),                      # top_n > blocks of a segment
        (1, 400, 4, 1, 8, 4, 16, 6, 0, None, None),                      # ties in unmasked chunks
    ])
    def test_select_blocks_ties_and_query_chunks(B, T, HQ, H, l, d, sel, top_n, q_offset, cu, scratch, monkeypatch):
        """Identical compressed keys make every interior block score the same: the lower block id must
        win each tie, as in the reference; a small scratch budget forces several query chunks."""
        from nsa_dist.kernels.nsa import scoring
        if scratch:
            monkeypatch.setattr(scoring, "_SELECT_SCRATCH", scratch)
        torch.manual_seed(T + top_n)
        Tc = n_compressed(T, q_offset, cu, l, d)
        q, k = torch.randn(B, T, HQ, 16), torch.randn(B, Tc, H, 16)
        k[:] = k[:, :1]
        _, lse = api.compressed_attention(q, k, k, block_len=l, stride=d, q_offset=q_offset, cu_seqlens=cu)
        kw = dict(block_len=l, stride=d, select_size=sel, top_n=top_n, q_offset=q_offset, cu_seqlens=cu)
        assert torch.equal(api.select_blocks(q, k, lse, backend="triton", **kw),
                           api.select_blocks(q, k, lse, backend="torch", **kw))

    def causal_block_ids(B, T, H, n, sel, q_offset, cu, seed, first=0):
        """Random distinct causal block ids >= first per (query, head), ascending, -1 last."""
        g = torch.Generator().manual_seed(seed)
        pos = token_layout(q_offset, T, cu, "cpu").pos
        nb = pos // sel + 1
        order = torch.rand(B, T, H, int(nb.max()) - first, generator=g).argsort(-1)[..., :n] + first
        idx = torch.where(order < nb.view(1, T, 1, 1), order, torch.full_like(order, -1))
        return naive.sort_block_ids(idx).to(torch.int32)

    @pytest.mark.parametrize("B,T,HQ,H,D,DV,sel,n,q_offset,k_offset,cu", [
        (2, 67, 2, 2, 16, 32, 16, 4, 0, 0, None),     # G = 1
        (1, 67, 4, 2, 48, 16, 16, 3, 5, 0, None),     # G = 2
        (1, 67, 16, 4, 16, 16, 16, 3, 0, 0, CU),      # G = 4, packed documents
        (1, 191, 16, 1, 16, 16, 32, 4, 0, 0, None),   # G = 16
        (1, 67, 2, 1, 16, 16, 32, 3, 40, 20, None),   # a shard whose keys start at a block's middle
    ])
    def test_selection_attention(B, T, HQ, H, D, DV, sel, n, q_offset, k_offset, cu):
        torch.manual_seed(T + HQ + n)
        Tk = q_offset + T - k_offset
        q = torch.randn(B, T, HQ, D, requires_grad=True)
        k = torch.randn(B, Tk, H, D, requires_grad=True)
        v = torch.randn(B, Tk, H, DV, requires_grad=True)
        first = -(-k_offset // sel)  # a shard may only select blocks that lie in its keys
        idx = causal_block_ids(B, T, H, n, sel, q_offset, cu, seed=T + n, first=first)
        kw = dict(select_size=sel, q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu)
        o_ref, lse_ref = api.selection_attention(q, k, v, idx, backend="torch", return_lse=True, **kw)
        o, lse = api.selection_attention(q, k, v, idx, backend="triton", return_lse=True, **kw)
        assert rel(o, o_ref) < TOL
        check_lse(lse, lse_ref)
        w, wl = torch.randn_like(o_ref), torch.randn_like(lse_ref)
        for a, b in zip(grads(o, (q, k, v), w, (lse, wl)), grads(o_ref, (q, k, v), w, (lse_ref, wl))):
            assert rel(a, b) < TOL
        o_only = api.selection_attention(q, k, v, idx, backend="triton", **kw)
        assert torch.equal(o_only, o)

    SEL_PATHS = {  # tuning entries that force each forward / dQ path of selection_attention
        "union": dict(sel_own=2.0),                  # every tile over its queries' union (a share > 1: never own)
        "own": dict(sel_own=0.0),                    # every tile of BT > 1 queries query by query
        "one_query": dict(sel=tuning.SelTile(1, 4, 1), sel_groups=()),  # tiles of one query (BT = 1)
        "table": {},                                 # the interpreter's table: mixed tiles, checked for determinism
    }

    @pytest.mark.parametrize("G,path", [(G, p) for G in (1, 2, 4, 7, 8, 16) for p in SEL_PATHS
                                        if G < 16 or p in ("one_query", "table")])  # G = 16: tiles of one query
    def test_selection_group_sizes(G, path):
        """Every group size on every path, odd length and value dim; with PyTorch's deterministic switch on,
        two runs agree bitwise (no atomics on any path)."""
        torch.manual_seed(G)
        B, T, H, D, DV, sel, n = 1, 37, 2 if G < 8 else 1, 16, 24, 8, 3
        q = torch.randn(B, T, G * H, D, requires_grad=True)
        k = torch.randn(B, T, H, D, requires_grad=True)
        v = torch.randn(B, T, H, DV, requires_grad=True)
        idx = causal_block_ids(B, T, H, n, sel, 0, None, seed=G)
        o_ref, lse_ref = api.selection_attention(q, k, v, idx, select_size=sel, backend="torch", return_lse=True)
        w, wl = torch.randn_like(o_ref), torch.randn_like(lse_ref)
        g_ref = grads(o_ref, (q, k, v), w, (lse_ref, wl))
        runs = 2 if path == "table" else 1
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            with tuning.override(**SEL_PATHS[path]):
                outs = [api.selection_attention(q, k, v, idx, select_size=sel, backend="triton", return_lse=True)
                        for _ in range(runs)]
                got = [(o, lse, *grads(o, (q, k, v), w, (lse, wl))) for o, lse in outs]
        finally:
            torch.use_deterministic_algorithms(was)
        o, lse, *g = got[0]
        assert rel(o, o_ref) < TOL
        check_lse(lse, lse_ref)
        for name, a, b in zip("qkv", g, g_ref):
            assert rel(a, b) < TOL, f"d{name}"
        for a, b in zip(got[0], got[-1]):
            assert torch.equal(a, b), "a second run must agree bitwise"

    def test_selection_attention_block_outside_keys_raises():
        q, k = torch.randn(1, 32, 2, 16), torch.randn(1, 24, 1, 16)
        idx = torch.full((1, 32, 1, 2), -1, dtype=torch.int32)
        idx[:, 20:, :, 0] = 0  # keys [0, 8) of block 0, but k starts at global token 8
        with pytest.raises(ValueError, match="outside the keys passed in"):
            api.selection_attention(q[:, 16:], k, k, idx[:, 16:], select_size=8, q_offset=16, k_offset=8,
                                    backend="triton")

    def test_nsa_attention_end_to_end_and_deterministic():
        torch.manual_seed(3)
        B, T, HQ, H, D = 1, 131, 8, 2, 16
        l, d, sel = 16, 8, 16
        Tc = num_compressed(T, l, d)
        leaves = [torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D),
                  torch.randn(B, Tc, H, D), torch.randn(B, Tc, H, D)] + \
                 [torch.rand(B, T, HQ) for _ in range(3)]
        leaves = [x.requires_grad_() for x in leaves]
        kw = dict(block_len=l, stride=d, select_size=sel, top_n=4, window=24)
        o_ref, idx_ref = api.nsa_attention(*leaves, backend="torch", return_idx=True, **kw)
        w = torch.randn_like(o_ref)
        g_ref = grads(o_ref, leaves, w)
        runs = []
        for _ in range(2):
            o, idx = api.nsa_attention(*leaves, backend="triton", return_idx=True, **kw)
            runs.append((o, idx, grads(o, leaves, w)))
        o, idx, g = runs[0]
        assert torch.equal(idx, idx_ref)
        assert rel(o, o_ref) < TOL
        for name, a, b in zip(["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"], g, g_ref):
            assert rel(a, b) < TOL, name
        for a, b in zip(g, runs[1][2]):  # no atomics: bitwise the same on a second run
            assert torch.equal(a, b)

    @pytest.mark.parametrize("branches", [2, 3])
    def test_gated_sum(branches):
        torch.manual_seed(branches)
        outs = [torch.randn(2, 37, 6, 24, requires_grad=True) for _ in range(branches)]
        gates = [torch.rand(2, 37, 6, requires_grad=True) for _ in range(branches)]
        o_ref = api.gated_sum(outs, gates, backend="torch")
        o = api.gated_sum(outs, gates, backend="triton")
        assert rel(o, o_ref) < TOL
        w = torch.randn_like(o_ref)
        for a, b in zip(grads(o, outs + gates, w), grads(o_ref, outs + gates, w)):
            assert rel(a, b) < TOL

    def test_half_precision_inputs():
        # fp16 here: Triton 3.9's interpreter computes bf16 tl.dot wrongly (a 16x16 bf16 product comes
        # out near 1e10); bf16 runs in tests/gpu on the device.
        torch.manual_seed(5)
        B, T, HQ, H, D = 1, 67, 4, 2, 16
        q = torch.randn(B, T, HQ, D).half().requires_grad_()
        k = torch.randn(B, T, H, D).half().requires_grad_()
        v = torch.randn(B, T, H, D).half().requires_grad_()
        o_ref = api.window_attention(q, k, v, window=20, backend="torch")
        o = api.window_attention(q, k, v, window=20, backend="triton")
        assert o.dtype == torch.float16
        assert rel(o, o_ref) < 1e-2
        idx = causal_block_ids(B, T, H, 3, 16, 0, None, seed=1)
        o_ref = api.selection_attention(q, k, v, idx, select_size=16, backend="torch")
        o = api.selection_attention(q, k, v, idx, select_size=16, backend="triton")
        assert rel(o, o_ref) < 1e-2
        w = torch.randn_like(o_ref.float())
        for a, b in zip(grads(o, (q, k, v), w), grads(o_ref, (q, k, v), w)):
            assert rel(a, b) < 1e-2
