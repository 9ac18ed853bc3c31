"""A converted Hugging Face Llama, and the project's own model with NSA or the sliding-window baseline, on a GPU
the way most training loops run them: fp32 weights under `torch.autocast("cuda", dtype=torch.bfloat16)`,
Triton kernels, forward and backward, against the same model in fp32 on the PyTorch reference. Tolerances
as tests/test_mixed_precision.py states them."""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LOGITS_TOL = 3e-2
GRAD_TOL = 1e-1


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 64), (28, 4, 128)], ids=["llama1b-G4", "qwen7b-G7"])
def test_converted_llama_under_autocast_on_triton_matches_fp32(heads, kv_heads, head_dim):
    transformers = pytest.importorskip("transformers")
    from nsa_dist import NSAConfig, convert_attention

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=heads * head_dim // 4, intermediate_size=1024,
                                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=head_dim, max_position_embeddings=8192)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).cuda()
    nsa = dict(block_len=32, stride=16, select_size=64, top_n=8, window=256)
    reference = convert_attention(copy.deepcopy(base), NSAConfig(**nsa, backend="torch"), gate_init="uniform")
    model = convert_attention(copy.deepcopy(base), NSAConfig(**nsa, backend="triton"), gate_init="uniform")
    model.load_state_dict(reference.state_dict())
    _check_triton_bf16_against_torch_fp32(model, reference, lambda m, ids: m(input_ids=ids).logits, vocab=512)


@pytest.mark.parametrize("attention", ["nsa", "window"])
def test_project_model_under_autocast_on_triton_matches_fp32(attention):
    from nsa_dist import ModelConfig, NSAConfig, NSATransformer

    shape = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                        attention=attention)
    nsa = dict(block_len=32, stride=16, select_size=64, top_n=8, window=256)
    torch.manual_seed(0)
    reference = NSATransformer(shape, NSAConfig(**nsa, backend="torch")).cuda()
    model = NSATransformer(shape, NSAConfig(**nsa, backend="triton")).cuda()
    model.load_state_dict(reference.state_dict())
    _check_triton_bf16_against_torch_fp32(model, reference, lambda m, ids: m(ids), vocab=512)


def _check_triton_bf16_against_torch_fp32(model, reference, logits_of, *, vocab: int):
    """`model` (Triton) under bf16 autocast against `reference` (torch, fp32), same weights, 2048 tokens."""
    ids = torch.randint(0, vocab, (1, 2048), device="cuda")

    ref_logits = logits_of(reference, ids)
    ref_logits.float().square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = logits_of(model, ids)
    assert logits.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    logits.float().square().mean().backward()

    assert rel(logits, ref_logits) < LOGITS_TOL
    names = [n for n, p in reference.named_parameters() if p.grad is not None]
    got = torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in names])
    want = torch.cat([dict(reference.named_parameters())[n].grad.flatten() for n in names])
    assert rel(got, want) < GRAD_TOL
