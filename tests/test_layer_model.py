import re

import pytest
import torch

from nsa_dist import DenseAttention, ModelConfig, NativeSparseAttention, NSAConfig, NSATransformer

TINY = dict(block_len=8, stride=4, select_size=16, top_n=4, window=24)


def layer(G=2, **kw):
    torch.manual_seed(0)
    return NativeSparseAttention(48, 2 * G, 2, 16, **{**TINY, **kw})


@pytest.mark.parametrize("kw", [{}, dict(compression="mean"), dict(separate_kv=True), dict(window=0), dict(G=1)])
def test_layer_forward_backward_reaches_every_parameter(kw):
    m = layer(**kw)
    x = torch.randn(2, 67, 48, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "compress_k.mlp.0" not in name and "compress_v.mlp.0" not in name:  # behind φ's zero output layer
            assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_layer_is_causal():
    m = layer()
    x = torch.randn(1, 120, 48)
    x2 = x.clone()
    x2[:, 80:] = torch.randn(1, 40, 48)
    y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :80], y2[:, :80], atol=1e-6)
    assert not torch.allclose(y[:, 80:], y2[:, 80:])


def test_packed_documents_equal_separate_runs():
    m = layer(G=4)
    docs = [torch.randn(1, n, 48) for n in (37, 70, 16)]
    packed = m(torch.cat(docs, 1), cu_seqlens=torch.tensor([0, 37, 107, 123]))
    separate = torch.cat([m(d) for d in docs], 1)
    assert (packed - separate).norm() / separate.norm() < 1e-5


def test_model_forward_backward():
    torch.manual_seed(0)
    model = NSATransformer(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
                           NSAConfig(**TINY))
    tokens = torch.randint(0, 256, (2, 96))
    logits = model(tokens)
    assert logits.shape == (2, 96, 256)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    h, hq, kv, d, l, ffn, vocab = 64, 4 * 16, 2 * 16, 16, TINY["block_len"], model.config.ffn_size, 256
    phi = l * d + (l * d * 2 * d + 2 * d) + (2 * d * d + d)  # positions, then the MLP's two layers
    per_layer = 2 * h + h * hq + h * 2 * kv + hq * h + (h * 3 * 4 + 3 * 4) + 2 * phi + 3 * h * ffn
    assert model.num_parameters() == vocab * h + 2 * per_layer + h + h * vocab


@pytest.mark.parametrize("kw,message", [
    (dict(select_size=18), "multiple of stride"),
    (dict(window=-1), "window must be positive"),
    (dict(top_n=2), "top_n=2"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(compression="max"), "compression='max'"),
    (dict(stride=40), "stride <= block_len"),
])
def test_bad_nsa_config_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        NSAConfig(**{**TINY, **kw}).validate()
    with pytest.raises(ValueError, match=message):
        NativeSparseAttention(48, 4, 2, 16, **{**TINY, **kw})


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        NativeSparseAttention(48, 3, 2, 16)
    with pytest.raises(ValueError, match="even"):
        NativeSparseAttention(48, 4, 2, 15)
    with pytest.raises(ValueError, match=r"expected x \[B, T, 48\]"):
        layer()(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=3, num_kv_heads=2).validate()
    with pytest.raises(ValueError, match="integer tensor"):
        NSATransformer(ModelConfig(hidden_size=32, num_layers=1, head_dim=8), NSAConfig(**TINY))(torch.randn(1, 8))


@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_layer_runs_under_bf16_autocast(compression):
    m = layer(compression=compression)
    x = torch.randn(1, 67, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    ref = m(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 5e-2


def plain_causal_gqa(layer, x, positions, window=None):
    """Dense causal attention written out: rotary pairs as complex numbers, keys repeated per group; with
    `window`, each query sees only the keys in (t - window, t]."""
    B, T, _ = x.shape
    proj = layer.proj
    H, HQ, D = proj.num_kv_heads, proj.num_heads, proj.head_dim
    q = (x @ proj.q_proj.weight.T).view(B, T, HQ, D)
    k, v = (x @ proj.kv_proj.weight.T).view(B, T, 2, H, D).unbind(2)
    freqs = proj.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), positions[:, None].double() * freqs)  # (T, D/2)

    def rotate(t):
        pairs = torch.complex(t[..., :D // 2].double(), t[..., D // 2:].double()) * turn[None, :, None]
        return torch.cat([pairs.real, pairs.imag], -1).float()

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(HQ // H, 2), v.repeat_interleave(HQ // H, 2)  # (B, T, HQ, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    if window is not None:
        hidden |= torch.ones(T, T, dtype=torch.bool).tril(-window)
    scores = scores.masked_fill(hidden, float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return o.reshape(B, T, HQ * D) @ proj.o_proj.weight.T


@pytest.mark.parametrize("G", [1, 3])
def test_dense_attention_is_plain_causal_gqa_with_the_nsa_layers_projections(G):
    torch.manual_seed(0)
    dense = DenseAttention(48, 2 * G, 2, 16, rope_theta=500.0)
    x = torch.randn(2, 37, 48)
    expected = plain_causal_gqa(dense, x, torch.arange(37))
    assert (dense(x) - expected).norm() / expected.norm() < 1e-5
    nsa_names = {n for n, _ in layer(G).named_parameters()}
    dense_names = {n for n, _ in dense.named_parameters()}
    assert dense_names == {"proj.q_proj.weight", "proj.kv_proj.weight", "proj.o_proj.weight"}
    assert dense_names < nsa_names
    assert all(n.startswith(("nsa.gate.", "nsa.compress_")) for n in nsa_names - dense_names)


def test_dense_packed_documents_equal_separate_runs():
    torch.manual_seed(0)
    dense = DenseAttention(48, 4, 2, 16)
    docs = [torch.randn(1, n, 48) for n in (37, 70, 16)]
    packed = dense(torch.cat(docs, 1), cu_seqlens=torch.tensor([0, 37, 107, 123]))
    separate = torch.cat([dense(d) for d in docs], 1)
    assert (packed - separate).norm() / separate.norm() < 1e-5


def test_dense_model_has_the_nsa_models_parameters_less_phi_and_gates():
    shape = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    dense = NSATransformer(ModelConfig(attention="dense", **shape), NSAConfig(**TINY))
    sparse = NSATransformer(ModelConfig(**shape), NSAConfig(**TINY))
    dense_names, sparse_names = dict(dense.named_parameters()), dict(sparse.named_parameters())
    assert set(dense_names) < set(sparse_names)
    assert all(re.search(r"\.attn\.nsa\.(gate|compress_[kv])\.", n) for n in set(sparse_names) - set(dense_names))
    assert all(dense_names[n].shape == sparse_names[n].shape for n in dense_names)
    tokens = torch.randint(0, 256, (2, 40))
    assert dense(tokens).shape == (2, 40, 256)
    with pytest.raises(ValueError, match="attention='full'"):
        ModelConfig(attention="full").validate()
