"""The torch backend of every op against dense masked attention built here, independently.

The dense side works in float64 from explicit per-token loops over documents and positions; the
ops run in fp32. Relative error ‖out − ref‖ / ‖ref‖ < 1e-5 for outputs and gradients.
"""
import itertools

import pytest
import torch

from nsa_dist.kernels import compressed_attention, gated_sum, nsa_attention, select_blocks
from nsa_dist.kernels import selection_attention, window_attention

TOL = 1e-5
SMALL = dict(block_len=8, stride=4, select_size=16)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def doc_positions(total, cu):
    """(doc, pos) of every global token, by plain iteration."""
    cu = [0, total] if cu is None else cu
    doc, pos = [], []
    for j in range(len(cu) - 1):
        for p in range(cu[j + 1] - cu[j]):
            doc.append(j)
            pos.append(p)
    return doc, pos


def compressed_owner(total, cu, block_len, stride):
    """(doc, index in doc) of every compressed token, documents packed in order."""
    cu = [0, total] if cu is None else cu
    out = []
    for j in range(len(cu) - 1):
        n = cu[j + 1] - cu[j]
        out += [(j, i) for i in range(max(0, (n - block_len) // stride + 1))]
    return out


def dense_attention(q, k, v, mask):
    """q [B,T,HQ,D], k/v [B,Tk,H,D], mask [B,T,HQ,Tk] bool → [B,T,HQ,Dv]; empty rows → 0."""
    G = q.shape[2] // k.shape[2]
    kx = k.double().repeat_interleave(G, dim=2)
    vx = v.double().repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bkhd->bthk", q.double(), kx) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bthk,bkhd->bthd", p, vx)


def make(B, T, HQ, H, D, Tk=None, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    Dv = D if Dv is None else Dv
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, Tk, H, D, generator=g)
    v = torch.randn(B, Tk, H, Dv, generator=g)
    return q, k, v


def grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out * w.to(out.dtype)).sum(), inputs)


def check_fwd_bwd(op_out, ref_out, op_inputs, ref_inputs):
    assert rel_err(op_out, ref_out) < TOL
    for a, b in zip(grads(op_out, op_inputs), grads(ref_out, ref_inputs)):
        assert rel_err(a, b) < TOL


def leaf(*ts, dtype=torch.float32):
    return [t.detach().to(dtype).requires_grad_() for t in ts]


CASES = [  # (T, HQ, H, cu_seqlens)
    (67, 4, 4, None),
    (191, 8, 4, None),
    (67, 16, 4, None),
    (191, 16, 1, None),
    (191, 6, 3, [0, 50, 51, 191]),
    (130, 4, 2, [0, 67, 130]),
]


@pytest.mark.parametrize("T,HQ,H,cu", CASES)
def test_compressed_attention(T, HQ, H, cu):
    l, d = SMALL["block_len"], SMALL["stride"]
    owners = compressed_owner(T, cu, l, d)
    q, kc, vc = make(1, T, HQ, H, 16, Tk=len(owners), Dv=12)
    doc, pos = doc_positions(T, cu)
    mask = torch.tensor([[dj == doc[t] and i * d + l - 1 <= pos[t] for (dj, i) in owners] for t in range(T)])
    mask = mask[None, :, None, :].expand(1, T, HQ, len(owners))
    cu_t = None if cu is None else torch.tensor(cu)
    ops = leaf(q, kc, vc)
    refs = leaf(q, kc, vc, dtype=torch.float64)
    o, lse = compressed_attention(*ops, block_len=l, stride=d, cu_seqlens=cu_t)
    check_fwd_bwd(o, dense_attention(*refs, mask), ops, refs)
    # lse: natural log-sum-exp of the scaled visible scores, -inf where nothing is visible
    s = torch.einsum("bthd,bkhd->bthk", q.double(), kc.double().repeat_interleave(HQ // H, 2)) / 4.0
    ref_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    seen = mask.any(-1)
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert rel_err(lse[seen], ref_lse[seen]) < TOL


@pytest.mark.parametrize("T,HQ,H,cu", CASES)
@pytest.mark.parametrize("window", [1, 13, 40])
def test_window_attention(T, HQ, H, cu, window):
    q, k, v = make(1, T, HQ, H, 8, Dv=5)
    doc, pos = doc_positions(T, cu)
    mask = torch.tensor([[doc[s] == doc[t] and pos[t] - window < pos[s] <= pos[t] for s in range(T)] for t in range(T)])
    mask = mask[None, :, None, :].expand(1, T, HQ, T)
    ops, refs = leaf(q, k, v), leaf(q, k, v, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu)
    o = window_attention(*ops, window=window, cu_seqlens=cu_t)
    check_fwd_bwd(o, dense_attention(*refs, mask), ops, refs)


def selection_mask(idx, T, HQ, cu, select_size, q_offset=0, k_offset=0, Tk=None):
    Tk = T if Tk is None else Tk
    total = max(q_offset + T, k_offset + Tk) if cu is None else cu[-1]
    doc, pos = doc_positions(total, cu)
    H = idx.shape[2]
    G = HQ // H
    mask = torch.zeros(1, T, HQ, Tk, dtype=torch.bool)
    for t, h in itertools.product(range(T), range(H)):
        gq = q_offset + t
        chosen = set(idx[0, t, h].tolist()) - {-1}
        for s in range(Tk):
            gk = k_offset + s
            if doc[gk] == doc[gq] and pos[gk] <= pos[gq] and pos[gk] // select_size in chosen:
                mask[0, t, h * G:(h + 1) * G, s] = True
    return mask


def random_idx(T, H, n, cu, select_size, q_offset=0, seed=3):
    """Valid, distinct, past-or-present block ids per (query, head), some slots left empty."""
    g = torch.Generator().manual_seed(seed)
    total = q_offset + T if cu is None else cu[-1]
    _, pos = doc_positions(total, cu)
    idx = torch.full((1, T, H, n), -1, dtype=torch.int32)
    for t, h in itertools.product(range(T), range(H)):
        avail = pos[q_offset + t] // select_size + 1
        take = int(torch.randint(1, min(n, avail) + 1, (1,), generator=g))
        idx[0, t, h, :take] = torch.randperm(avail, generator=g)[:take].to(torch.int32)
    return idx


@pytest.mark.parametrize("T,HQ,H,cu", CASES)
def test_selection_attention(T, HQ, H, cu):
    l_sel, n = SMALL["select_size"], 3
    q, k, v = make(1, T, HQ, H, 8, Dv=10)
    idx = random_idx(T, H, n, cu, l_sel)
    mask = selection_mask(idx, T, HQ, cu, l_sel)
    ops, refs = leaf(q, k, v), leaf(q, k, v, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu)
    o = selection_attention(*ops, idx, select_size=l_sel, cu_seqlens=cu_t)
    check_fwd_bwd(o, dense_attention(*refs, mask), ops, refs)


def test_selection_attention_long_range_gather_path():
    """A key range longer than the selected keys takes the gather path of the reference."""
    T, HQ, H, l_sel, n = 150, 4, 2, 8, 2
    q, k, v = make(1, T, HQ, H, 8)
    idx = random_idx(T, H, n, None, l_sel, seed=5)
    mask = selection_mask(idx, T, HQ, None, l_sel)
    ops, refs = leaf(q, k, v), leaf(q, k, v, dtype=torch.float64)
    o = selection_attention(*ops, idx, select_size=l_sel)
    check_fwd_bwd(o, dense_attention(*refs, mask), ops, refs)


def test_position_offsets():
    """A slice of queries with keys that start later than token 0 gives the rows of the full run."""
    T_all, HQ, H, window, l_sel = 191, 4, 2, 20, 16
    q, k, v = make(1, T_all, HQ, H, 8)
    qo, ko = 120, 120 - (window - 1)
    full = window_attention(q, k, v, window=window)
    part = window_attention(q[:, qo:], k[:, ko:], v[:, ko:], window=window, q_offset=qo, k_offset=ko)
    assert rel_err(part, full[:, qo:]) < TOL
    idx = random_idx(T_all, H, 3, None, l_sel)
    full = selection_attention(q, k, v, idx, select_size=l_sel)
    part = selection_attention(q[:, qo:], k, v, idx[:, qo:], select_size=l_sel, q_offset=qo)
    assert rel_err(part, full[:, qo:]) < TOL
    # a slice of keys starting at block 2 serves queries whose blocks all lie there
    idx_late = idx[:, qo:].clone()
    idx_late[(idx_late >= 0) & (idx_late < 2)] = -1
    ks = 2 * l_sel
    part = selection_attention(q[:, qo:], k[:, ks:], v[:, ks:], idx_late, select_size=l_sel, q_offset=qo, k_offset=ks)
    ref = selection_attention(q[:, qo:], k, v, idx_late, select_size=l_sel, q_offset=qo)
    assert rel_err(part, ref) < TOL
    l, d = SMALL["block_len"], SMALL["stride"]
    kc, vc = make(1, 46, H, H, 8)[1:]
    full, lse_full = compressed_attention(q, kc, vc, block_len=l, stride=d)
    part, lse_part = compressed_attention(q[:, qo:], kc, vc, block_len=l, stride=d, q_offset=qo)
    assert rel_err(part, full[:, qo:]) < TOL and rel_err(lse_part, lse_full[:, qo:]) < TOL


def test_window_needs_its_halo():
    q, k, v = make(1, 40, 2, 2, 8)
    with pytest.raises(ValueError, match="halo"):
        window_attention(q[:, 20:], k[:, 25:], v[:, 25:], window=10, q_offset=20, k_offset=25)


def expected_selection(q, kc, cu, T, HQ, H, l, d, l_sel, n, num_init=1, num_local=2):
    """Top-n sets from the paper's formulas, evaluated term by term."""
    owners = compressed_owner(T, cu, l, d)
    doc, pos = doc_positions(T, cu)
    G = HQ // H
    s = torch.einsum("thd,khd->thk", q[0].double(), kc[0].double().repeat_interleave(G, 1)) / q.shape[-1] ** 0.5
    out = {}
    for t in range(T):
        vis = [c for c, (dj, i) in enumerate(owners) if dj == doc[t] and i * d + l - 1 <= pos[t]]
        nblk = pos[t] // l_sel + 1
        forced = {b for b in range(nblk) if b < num_init or 0 <= pos[t] // l_sel - b < num_local}
        for h in range(H):
            score = [0.0] * nblk
            for hq in range(h * G, (h + 1) * G):
                if not vis:
                    continue
                p = torch.softmax(s[t, hq, vis], 0)
                for pc, c in zip(p.tolist(), vis):
                    i = owners[c][1]
                    for b in range(nblk):  # Eq. 9: weight = keys shared by token i and block b, over d
                        overlap = min(i * d + l, (b + 1) * l_sel) - max(i * d, b * l_sel)
                        score[b] += pc * max(0, overlap) / d
            rest = sorted((b for b in range(nblk) if b not in forced), key=lambda b: (-score[b], b))
            out[t, h] = (forced | set(rest[: max(0, n - len(forced))]), score)
    return out


@pytest.mark.parametrize("T,HQ,H,cu", CASES)
def test_select_blocks(T, HQ, H, cu):
    l, d, l_sel, n = SMALL["block_len"], SMALL["stride"], SMALL["select_size"], 5
    owners = compressed_owner(T, cu, l, d)
    q, kc, _ = make(1, T, HQ, H, 16, Tk=len(owners), seed=7)
    cu_t = None if cu is None else torch.tensor(cu)
    _, lse = compressed_attention(q, kc, kc, block_len=l, stride=d, cu_seqlens=cu_t)
    idx = select_blocks(q, kc, lse, block_len=l, stride=d, select_size=l_sel, top_n=n, cu_seqlens=cu_t)
    assert idx.dtype == torch.int32 and idx.shape == (1, T, H, n)
    expected = expected_selection(q, kc, cu, T, HQ, H, l, d, l_sel, n)
    _, pos = doc_positions(T, cu)
    for (t, h), (want, score) in expected.items():
        row = idx[0, t, h].tolist()
        got = [b for b in row if b >= 0]
        assert row == got + [-1] * (n - len(got)), "ids ascending, empty slots last"
        assert got == sorted(set(got)), "no duplicates"
        assert 0 in got and pos[t] // l_sel in got, "the initial and the current block are always chosen"
        if pos[t] >= l_sel:
            assert pos[t] // l_sel - 1 in got, "the previous local block is always chosen"
        assert max(got) * l_sel <= pos[t], "never a future block"
        if set(got) != want:  # only an exact tie in score may swap a block
            diff = set(got) ^ want
            vals = [score[b] for b in diff]
            assert max(vals) - min(vals) < 1e-9, (t, h, got, sorted(want))


def test_select_blocks_paper_defaults_pad_with_empty():
    T, HQ, H = 191, 4, 1
    q, kc, _ = make(1, T, HQ, H, 16, Tk=(T - 32) // 16 + 1)
    _, lse = compressed_attention(q, kc, kc)
    idx = select_blocks(q, kc, lse)  # l=32, d=16, l'=64, n=16 > the 3 blocks there are
    assert idx.shape[-1] == 16
    assert idx[0, 190, 0, :3].tolist() == [0, 1, 2] and (idx[0, 190, 0, 3:] == -1).all()
    assert idx[0, 10, 0].tolist() == [0] + [-1] * 15


@pytest.mark.parametrize("G", [1, 2, 4, 16])
def test_nsa_attention_matches_dense_sum(G):
    T, H, D, n, window = 191, 2 if G < 16 else 1, 8, 4, 30
    HQ = G * H
    l, d, l_sel = SMALL["block_len"], SMALL["stride"], SMALL["select_size"]
    q, k, v = make(1, T, HQ, H, D, seed=G)
    kc, vc = make(1, (T - l) // d + 1, H, H, D, seed=G + 1)[1:]
    gate = torch.rand(3, 1, T, HQ, generator=torch.Generator().manual_seed(G))
    ops = leaf(q, k, v, kc, vc, *gate)
    refs = leaf(q, k, v, kc, vc, *gate, dtype=torch.float64)
    o, idx = nsa_attention(*ops, block_len=l, stride=d, select_size=l_sel, top_n=n, window=window, return_idx=True)
    doc, pos = doc_positions(T, None)
    owners = compressed_owner(T, None, l, d)
    m_cmp = torch.tensor([[i * d + l - 1 <= pos[t] for (_, i) in owners] for t in range(T)])[None, :, None].expand(1, T, HQ, -1)
    m_win = torch.tensor([[t - window < s <= t for s in range(T)] for t in range(T)])[None, :, None].expand(1, T, HQ, -1)
    m_slc = selection_mask(idx, T, HQ, None, l_sel)
    rq, rk, rv, rkc, rvc, g0, g1, g2 = refs
    ref = (g0[..., None] * dense_attention(rq, rkc, rvc, m_cmp) + g1[..., None] * dense_attention(rq, rk, rv, m_slc)
           + g2[..., None] * dense_attention(rq, rk, rv, m_win))
    check_fwd_bwd(o, ref, ops, refs)


def test_nsa_attention_without_window_and_with_separate_kv():
    T, HQ, H, D = 100, 4, 2, 8
    q, k, v = make(1, T, HQ, H, D)
    _, k2, v2 = make(1, T, HQ, H, D, seed=9)
    kc, vc = make(1, (T - 8) // 4 + 1, H, H, D, seed=2)[1:]
    g = torch.rand(1, T, HQ)
    o = nsa_attention(q, k, v, kc, vc, g, g, None, window=0, top_n=3, **SMALL)
    o_cmp, lse = compressed_attention(q, kc, vc, block_len=8, stride=4)
    idx = select_blocks(q, kc, lse, top_n=3, **SMALL)
    o_slc = selection_attention(q, k, v, idx, select_size=16)
    assert rel_err(o, g[..., None] * (o_cmp + o_slc)) < TOL
    o_sep = nsa_attention(q, k, v, kc, vc, g, g, g, window=10, top_n=3, k_win=k2, v_win=v2, **SMALL)
    o_win = window_attention(q, k2, v2, window=10)
    assert rel_err(o_sep, g[..., None] * (o_cmp + o_slc + o_win)) < TOL


def test_selected_block_outside_the_keys_is_named():
    """The check sits in the api, before either backend: k from token 16 cannot serve block 0."""
    q, k, v = make(1, 40, 4, 2, 8)
    idx = random_idx(40, 2, 3, None, 8)
    idx[:, 30:, :, 0] = 0
    with pytest.raises(ValueError, match="outside the keys passed in.*\\[16, 40\\)"):
        selection_attention(q[:, 24:], k[:, 16:], v[:, 16:], idx[:, 24:], select_size=8, q_offset=24, k_offset=16)
    idx[:, 30:, :, 0] = -1  # the other blocks of these queries, ids >= 2, lie in k
    idx[(idx >= 0) & (idx < 2)] = -1
    selection_attention(q[:, 24:], k[:, 16:], v[:, 16:], idx[:, 24:], select_size=8, q_offset=24, k_offset=16)


def test_seq_len_changes_nothing():
    """A shard of packed documents needs no seq_len: cu_seqlens may run past the slices."""
    q, k, v = make(1, 40, 4, 2, 8)
    cu = torch.tensor([0, 25, 70])
    o = window_attention(q[:, 20:], k, v, window=8, q_offset=20, cu_seqlens=cu)
    assert torch.equal(o, window_attention(q[:, 20:], k, v, window=8, q_offset=20, cu_seqlens=cu))
    assert rel_err(o, window_attention(q, k, v, window=8, cu_seqlens=torch.tensor([0, 25, 40]))[:, 20:]) < TOL


BAD = [
    (lambda q, k, v: window_attention(q, k, v[:, :, :1]), "mismatched head counts"),
    (lambda q, k, v: window_attention(q[:, :, :3], k, v), "not divisible"),
    (lambda q, k, v: window_attention(q[..., :4], k, v), "head dims differ"),
    (lambda q, k, v: window_attention(q, k, v, window=0), "window must be positive"),
    (lambda q, k, v: window_attention(q, k, v, window=-3), "window must be positive"),
    (lambda q, k, v: window_attention(q, k, v, backend="cuda"), "unknown backend"),
    (lambda q, k, v: window_attention(q, k, v, cu_seqlens=torch.tensor([0, 10, 30])), "do not match cu_seqlens"),
    (lambda q, k, v: window_attention(q[0], k, v), "4-D"),
    (lambda q, k, v: select_blocks(q, k[:, :9], torch.zeros(1, 40, 4), block_len=8, stride=4, select_size=18),
     "multiple of the compression stride"),
    (lambda q, k, v: select_blocks(q, k[:, :9], torch.zeros(1, 40, 4), block_len=8, stride=4, select_size=16,
                                   top_n=2), "num_init \\+ num_local"),
    (lambda q, k, v: compressed_attention(q, k[:, :3], v[:, :3], block_len=8, stride=4), "compressed tokens"),
    (lambda q, k, v: gated_sum([q], [q[..., 0]]), "two or three"),
    (lambda q, k, v: gated_sum([q, q], [q[..., 0], q[:, :5, :, 0]]), "gates be \\[B, T, HQ\\]"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_is_named(call, message):
    q, k, v = make(1, 40, 4, 2, 8)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


@pytest.mark.parametrize("call", [
    lambda q, k, v: window_attention(q, k, v, backend="triton"),
    lambda q, k, v: gated_sum([q, q], [q[..., 0], q[..., 0]], backend="triton"),
])
def test_triton_backend_on_cpu_tensors_is_named(call, monkeypatch):
    """backend='triton' with CPU tensors (and no interpreter) says what to do instead of failing in
    Triton's driver lookup."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make(1, 40, 4, 2, 8)
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        call(q, k, v)


def test_auto_backend_falls_back_only_without_triton_and_says_so_once(monkeypatch):
    """backend="auto" on CUDA runs the reference only when triton is not installed, with one warning; an
    ImportError from inside the kernels is raised, not turned into a silent, many-fold slower run."""
    import importlib.util
    import warnings

    from nsa_dist.kernels.nsa import api

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    api._triton_installed.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert api._resolve_backend("auto", torch.device("cuda")) == "torch"
            assert api._resolve_backend("auto", torch.device("cuda")) == "torch"
        assert [str(w.message) for w in seen if "triton is not installed" in str(w.message)] and len(seen) == 1
    finally:
        api._triton_installed.cache_clear()

    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(api.importlib, "import_module", lambda *a, **k: (_ for _ in ()).throw(ImportError("broken")))
    if real_find_spec("triton") is not None:
        with pytest.raises(ImportError, match="broken"):
            api._triton_op("gated_sum")
