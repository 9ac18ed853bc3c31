"""Mixed precision as training loops run it: fp32 weights under `torch.autocast(bfloat16)`, forward and
backward, for this project's model (NSA and dense) and converted Hugging Face Llama, Mistral, Qwen2 and Qwen3.

The ops take q, k, v and the compressed K/V at the autocast dtype, as SDPA does (a converted model's rotary
embedding returns fp32 q and k beside a bf16 v); outside autocast, mixed dtypes are still refused. bf16 keeps
8 bits of mantissa, so logits and gradients are compared to the fp32 run by relative error, within
`LOGITS_TOL` and `GRAD_TOL`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from nsa_dist import ModelConfig, NSAConfig, NSATransformer, convert_attention
from nsa_dist.kernels import compressed_attention, selection_attention, window_attention

NSA = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=32, backend="torch")
VOCAB, T = 97, 96  # three windows long: every branch reaches past the window
LOGITS_TOL = 3e-2
GRAD_TOL = 1e-1


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _run(model, ids, autocast: bool):
    """Logits and the parameter gradients of a mean-of-logits loss, under CPU bf16 autocast or in fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids) if hasattr(model, "config") and hasattr(model.config, "model_type") else model(ids)
        logits = getattr(out, "logits", out)
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _check_against_fp32(model):
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    reference, ref_grads = _run(model, ids, autocast=False)
    logits, grads = _run(model, ids, autocast=True)
    assert logits.dtype == torch.bfloat16  # autocast really ran the projections in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rel(logits, reference) < LOGITS_TOL, rel(logits, reference)
    assert set(grads) == set(ref_grads)
    flat, ref_flat = (torch.cat([g[n].flatten().float() for n in sorted(ref_grads)]) for g in (grads, ref_grads))
    assert rel(flat, ref_flat) < GRAD_TOL, rel(flat, ref_flat)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("attention", ["nsa", "dense", "window"])
def test_project_model_under_autocast_matches_fp32(attention):
    torch.manual_seed(0)
    model = NSATransformer(ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=16, attention=attention), NSA)
    _check_against_fp32(model)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_converted_hugging_face_model_under_autocast_matches_fp32(family):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, f"{family.capitalize()}ForCausalLM"):
        pytest.skip(f"this transformers has no {family}")
    config = getattr(transformers, f"{family.capitalize()}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        **({"sliding_window": None} if family == "mistral" else {}))
    torch.manual_seed(0)
    model = getattr(transformers, f"{family.capitalize()}ForCausalLM")(config)
    converted = convert_attention(copy.deepcopy(model), NSA, gate_init="uniform")  # every branch carries weight
    _check_against_fp32(converted)


def test_ops_cast_to_the_autocast_dtype_and_refuse_mixed_dtypes_outside_it():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 4, 16, generator=g)  # fp32, as a rotary embedding returns it
    k = torch.randn(1, 64, 2, 16, generator=g)
    v = torch.randn(1, 64, 2, 16, generator=g).bfloat16()  # bf16, as a projection under autocast returns it
    with pytest.raises(ValueError, match="dtypes differ"):
        window_attention(q, k, v, window=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = window_attention(q, k, v, window=16)
        k_cmp, v_cmp = k[:, :15], v[:, :15]
        o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, block_len=8, stride=4)
        idx = torch.zeros(1, 64, 2, 1, dtype=torch.int32)
        o_sel = selection_attention(q, k, v, idx, select_size=16)
    assert o.dtype == o_cmp.dtype == o_sel.dtype == torch.bfloat16
    assert lse.dtype == torch.float32
    expected = window_attention(q.bfloat16(), k.bfloat16(), v, window=16)
    assert torch.equal(o, expected)
