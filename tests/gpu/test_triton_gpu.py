"""Triton kernels on a CUDA device vs the fp32 torch reference, at real sizes, bf16.

Outputs are compared up to T = 64k; gradients at 8k, where the reference's autograd graph (it
keeps every chunk's gathered keys) still fits in memory. Relative error ||out - ref|| / ||ref||.
Output buffers start as NaN (the kernels poison them under PyTorch's deterministic mode with
`fill_uninitialized_memory`, which every test here runs in), so an element no program writes fails.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = 1e-2
NEAR_TIE = 1e-3  # relative gap to a row's n-th score under which bf16 sums may order two blocks either way


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """warn_only: the reference's cuBLAS matmuls have no deterministic mode without a workspace
    setting, and only the poisoning is wanted here."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


def api():
    from nsa_dist.kernels.nsa import api as a
    return a


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape, dtype=torch.bfloat16, grad=False):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def grads(out, inputs, w):
    return torch.autograd.grad((out.float() * w).sum(), inputs)


def compressed_inputs(T, HQ, H, D, DV, l, d, grad, dtype=torch.bfloat16):
    Tc = (T - l) // d + 1
    return randn(1, T, HQ, D, dtype=dtype, grad=grad), randn(1, Tc, H, D, dtype=dtype, grad=grad), \
        randn(1, Tc, H, DV, dtype=dtype, grad=grad)


@pytest.mark.parametrize("T,HQ,H,with_grad", [(65536, 16, 1, False), (8192, 16, 1, True), (8192, 4, 4, True)])
def test_compressed_attention(T, HQ, H, with_grad):
    torch.manual_seed(0)
    q, k, v = compressed_inputs(T, HQ, H, 128, 128, 32, 16, with_grad)
    o_ref, lse_ref = api().compressed_attention(q, k, v, block_len=32, stride=16, backend="torch")
    o, lse = api().compressed_attention(q, k, v, block_len=32, stride=16, backend="triton")
    assert rel(o, o_ref) < TOL
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)) and rel(lse[fin], lse_ref[fin]) < 1e-3
    if with_grad:
        w = torch.randn_like(o_ref.float())
        for a, b in zip(grads(o, (q, k, v), w), grads(o_ref, (q, k, v), w)):
            assert rel(a, b) < TOL


@pytest.mark.parametrize("T,HQ,H,with_grad", [(65536, 16, 1, False), (8192, 16, 2, True), (8192, 2, 2, True)])
def test_window_attention(T, HQ, H, with_grad):
    torch.manual_seed(1)
    q, k, v = randn(1, T, HQ, 128, grad=with_grad), randn(1, T, H, 128, grad=with_grad), \
        randn(1, T, H, 128, grad=with_grad)
    o_ref = api().window_attention(q, k, v, window=512, backend="torch")
    o = api().window_attention(q, k, v, window=512, backend="triton")
    assert rel(o, o_ref) < TOL
    if with_grad:
        w = torch.randn_like(o_ref.float())
        for a, b in zip(grads(o, (q, k, v), w), grads(o_ref, (q, k, v), w)):
            assert rel(a, b) < TOL


@pytest.mark.parametrize("T,HQ,H,segment", [
    (65536, 16, 1, None), (131072, 16, 1, None), (8192, 4, 4, None),
    (131072, 16, 1, 1024),  # rows of 2048 blocks in two top-n segments: the (score, id) candidate path
])
def test_select_blocks(T, HQ, H, segment):
    """Same lse into both; bf16 products summed in another order can flip a near-tie, so allow a
    tiny fraction of rows to differ, and only where the reference's own scores nearly tie: every
    block chosen by one side only scores within NEAR_TIE of the row's n-th score."""
    from nsa_dist.kernels.nsa import tuning
    torch.manual_seed(2)
    q, k, v = compressed_inputs(T, HQ, H, 128, 128, 32, 16, False)
    _, lse = api().compressed_attention(q, k, v, block_len=32, stride=16, backend="torch")
    kw = dict(block_len=32, stride=16, select_size=64, top_n=16)
    ref = api().select_blocks(q, k, lse, backend="torch", **kw)
    with tuning.override(**({"topn_segment": segment} if segment else {})):
        out = api().select_blocks(q, k, lse, backend="triton", **kw)
    same = (out == ref).all(-1)
    assert same.float().mean().item() > 0.999, same.float().mean().item()
    assert ((out >= -1) & (out < T // 64)).all()
    for t, h in (~same[0]).nonzero().tolist():
        score = reference_block_scores(q, k, lse, t, h, **kw)
        nth = score.sort(descending=True).values[kw["top_n"] - 1]
        a, b = set(out[0, t, h].tolist()) - {-1}, set(ref[0, t, h].tolist()) - {-1}
        gap = (score[sorted(a ^ b)] - nth).abs().max().item()
        assert gap <= NEAR_TIE * nth.item(), (t, h, sorted(a - b), sorted(b - a), gap, nth.item())


def reference_block_scores(q, k_cmp, lse, t, h, *, block_len, stride, select_size, top_n, num_init=1, num_local=2):
    """The reference's score of every block for query t, KV head h (Eq. 8-10; forced blocks +inf,
    future ones -inf), in fp32 from the same bf16 inputs."""
    from nsa_dist.kernels.nsa.naive import block_overlap_weights
    G = q.shape[2] // k_cmp.shape[2]
    s = q[0, t, h * G:(h + 1) * G].float() @ k_cmp[0, :, h].float().T * q.shape[-1] ** -0.5  # (G, Tc)
    seen = torch.arange(k_cmp.shape[1], device=q.device) * stride + block_len - 1 <= t
    p = torch.where(seen, torch.exp(s - lse[0, t, h * G:(h + 1) * G, None]), 0.0).sum(0)
    nb = t // select_size + 1
    score = p @ block_overlap_weights(k_cmp.shape[1], nb, block_len, stride, select_size, q.device)
    blk = torch.arange(nb, device=q.device)
    return torch.where((blk < num_init) | (nb - 1 - blk < num_local), float("inf"), score)


def causal_block_ids(T, H, n, sel, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = torch.arange(T, device="cuda") // sel + 1
    score = torch.rand(1, T, H, T // sel + 1, device="cuda", generator=g)
    score = score.masked_fill(torch.arange(T // sel + 1, device="cuda") >= nb.view(1, T, 1, 1), -1)
    top = score.topk(n, -1)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
    from nsa_dist.kernels import sort_block_ids
    return sort_block_ids(idx).to(torch.int32)


@pytest.mark.parametrize("T,HQ,H,with_grad", [
    (65536, 16, 1, False), (8192, 16, 1, True), (8192, 8, 1, True), (8192, 4, 1, True), (8192, 2, 1, True),
    (8192, 2, 2, True)])
def test_selection_attention(T, HQ, H, with_grad):
    torch.manual_seed(3)
    q, k, v = randn(1, T, HQ, 128, grad=with_grad), randn(1, T, H, 128, grad=with_grad), \
        randn(1, T, H, 128, grad=with_grad)
    idx = causal_block_ids(T, H, 16, 64, seed=T + HQ)
    o_ref, lse_ref = api().selection_attention(q, k, v, idx, select_size=64, backend="torch", return_lse=True)
    o, lse = api().selection_attention(q, k, v, idx, select_size=64, backend="triton", return_lse=True)
    assert rel(o, o_ref) < TOL
    assert rel(lse, lse_ref) < 1e-3
    if with_grad:
        w, wl = torch.randn_like(o_ref.float()), torch.randn_like(lse_ref)
        g = torch.autograd.grad((o.float() * w).sum() + (lse * wl).sum(), (q, k, v))
        for a, b in zip(g, torch.autograd.grad((o_ref.float() * w).sum() + (lse_ref * wl).sum(), (q, k, v))):
            assert rel(a, b) < TOL
        o, lse = api().selection_attention(q, k, v, idx, select_size=64, backend="triton", return_lse=True)
        for a, b in zip(g, torch.autograd.grad((o.float() * w).sum() + (lse * wl).sum(), (q, k, v))):
            assert torch.equal(a, b), "backward must be deterministic"


SEL_PATHS = {"union": dict(sel_own=2.0), "own": dict(sel_own=0.0), "table": {}}  # see tests/test_triton_kernels.py


@pytest.mark.parametrize("G", [1, 2, 4, 7, 8, 16])
@pytest.mark.parametrize("path", list(SEL_PATHS))
def test_selection_group_sizes(G, path):
    """Each group size on each forward / dQ path at 8k, bf16, two KV heads: o, lse, dq, dk, dv against the
    reference, and a second run bitwise equal (the deterministic switch is on, see `poisoned_outputs`)."""
    from nsa_dist.kernels.nsa import tuning
    torch.manual_seed(G)
    T, H = 8192, 2
    q, k, v = randn(1, T, G * H, 128, grad=True), randn(1, T, H, 128, grad=True), randn(1, T, H, 128, grad=True)
    idx = causal_block_ids(T, H, 16, 64, seed=T + G)
    o_ref, lse_ref = api().selection_attention(q, k, v, idx, select_size=64, backend="torch", return_lse=True)
    w, wl = torch.randn_like(o_ref.float()), torch.randn_like(lse_ref)
    g_ref = torch.autograd.grad((o_ref.float() * w).sum() + (lse_ref * wl).sum(), (q, k, v))
    runs = []
    with tuning.override(**SEL_PATHS[path]):
        for _ in range(2):
            o, lse = api().selection_attention(q, k, v, idx, select_size=64, backend="triton", return_lse=True)
            runs.append((o, lse, *torch.autograd.grad((o.float() * w).sum() + (lse * wl).sum(), (q, k, v))))
    o, lse, *g = runs[0]
    assert rel(o, o_ref) < TOL
    assert rel(lse, lse_ref) < 1e-3
    for name, a, b in zip("qkv", g, g_ref):
        assert rel(a, b) < TOL, f"d{name}"
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b), "selection must be deterministic"


def test_packed_documents_offsets_fp16_head_dims():
    """cu_seqlens, a query shard with its halo, fp16, d_qk = 256 != d_v = 64, all three branches."""
    torch.manual_seed(4)
    a = api()
    T, HQ, H, D, DV = 4096, 8, 2, 256, 64
    cu = torch.tensor([0, 1000, 1001, 3000, T], device="cuda", dtype=torch.int32)
    q = randn(1, T, HQ, D, dtype=torch.float16, grad=True)
    k, v = randn(1, T, H, D, dtype=torch.float16, grad=True), randn(1, T, H, DV, dtype=torch.float16, grad=True)
    from nsa_dist.kernels.nsa.layout import compression_blocks
    kc = compression_blocks(k.detach(), 32, 16, cu).mean(2).requires_grad_()
    vc = compression_blocks(v.detach(), 32, 16, cu).mean(2).requires_grad_()
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]
    leaves = [q, k, v, kc, vc] + gates
    kw = dict(block_len=32, stride=16, select_size=64, top_n=8, window=128, cu_seqlens=cu)
    o_ref, idx_ref = a.nsa_attention(*leaves, backend="torch", return_idx=True, **kw)
    o, idx = a.nsa_attention(*leaves, backend="triton", return_idx=True, **kw)
    assert (idx == idx_ref).all(-1).float().mean().item() > 0.999
    assert rel(o, o_ref) < TOL
    w = torch.randn_like(o_ref.float())
    for a_, b_ in zip(grads(o, leaves, w), grads(o_ref, leaves, w)):
        assert rel(a_, b_) < TOL
    s, e = 2500, 3900  # a shard [2500, 3900) with keys from 2500 - 127 for the window
    qs = q.detach()[:, s:e]
    ks, vs = k.detach()[:, s - 127:e], v.detach()[:, s - 127:e]
    o_ref = a.window_attention(qs, ks, vs, window=128, q_offset=s, k_offset=s - 127, cu_seqlens=cu,
                               backend="torch")
    o = a.window_attention(qs, ks, vs, window=128, q_offset=s, k_offset=s - 127, cu_seqlens=cu,
                           backend="triton")
    assert rel(o, o_ref) < TOL
