"""model.attention=window, the sliding-window baseline: the math written out, packed documents, sequence
parallelism on 2 gloo ranks against one process, the trainer, the FLOP count."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nsa_dist import ModelConfig, NSAConfig, NSATransformer
from nsa_dist.config import run_config
from nsa_dist.nn.layer import WindowAttention
from nsa_dist.train import main
from nsa_dist.training.metrics import model_flops_per_sequence, window_attention_flops
from tests.multirank import run_ranks
from tests.test_models import sharded_against_one_process
from tests.test_layer_model import plain_causal_gqa

SHAPE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             attention="window")
# 40 keys: more than a zigzag chunk of 32 at 128 tokens on 2 ranks, so the halo spans two chunks
NSA = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=40, backend="torch")


@pytest.mark.parametrize("G,window", [(1, 7), (3, 16), (2, 64)])
def test_window_attention_is_causal_gqa_over_the_last_window_keys(G, window):
    torch.manual_seed(0)
    layer = WindowAttention(48, 2 * G, 2, 16, window=window, rope_theta=500.0, backend="torch")
    x = torch.randn(2, 37, 48)
    expected = plain_causal_gqa(layer, x, torch.arange(37), window=window)
    assert (layer(x) - expected).norm() / expected.norm() < 1e-5
    assert {n for n, _ in layer.named_parameters()} == {"proj.q_proj.weight", "proj.kv_proj.weight",
                                                        "proj.o_proj.weight"}


def test_window_packed_documents_equal_separate_runs():
    torch.manual_seed(0)
    layer = WindowAttention(48, 4, 2, 16, window=9, backend="torch")
    docs = [torch.randn(1, n, 48) for n in (37, 70, 16)]
    packed = layer(torch.cat(docs, 1), cu_seqlens=torch.tensor([0, 37, 107, 123]))
    separate = torch.cat([layer(d) for d in docs], 1)
    assert (packed - separate).norm() / separate.norm() < 1e-5


def test_window_model_has_the_dense_models_parameters():
    dense = NSATransformer(ModelConfig(**{**SHAPE, "attention": "dense"}), NSA)
    window = NSATransformer(ModelConfig(**SHAPE), NSA)
    assert {n: p.shape for n, p in dense.named_parameters()} == {n: p.shape for n, p in window.named_parameters()}


def test_window_needs_a_window_and_the_projects_own_model(compose_config):
    with pytest.raises(ValueError, match=r"model\.attention=window .* set nsa\.window"):
        run_config(compose_config("model.attention=window", "nsa.window=0"))
    with pytest.raises(ValueError, match="attention=window is built for kind=nsa"):
        run_config(compose_config("model=hf_llama", "model.attention=window"))


def window_ranks(rank, world_size):
    errors, stats = sharded_against_one_process(ModelConfig(**SHAPE), NSA)
    return errors, {s.mode for s in stats}, all(0 < s.halo_bytes < s.allgather_bytes for s in stats)


def test_window_attention_under_sequence_parallelism_equals_one_process():
    for errors, modes, halo_only in run_ranks(window_ranks, 2):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (worst, errors[worst])
        assert modes == {"halo"} and halo_only


def test_model_attention_window_trains(compose_config, tmp_path):
    losses = main(compose_config("model.attention=window", "trainer.steps=5", "data.seq_len=256",
                                 "trainer.batch_size=2", "trainer.eval_batch_size=2", "trainer.progress_bar=false",
                                 "trainer.device=cpu"), run_dir=tmp_path).losses
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.2, losses


def test_window_flops_count_its_own_matrix_products():
    """Beyond its windowed attention (4·HQ·D per visible pair, fewer than dense's), the count is what torch's
    FLOP counter sees in mm / addmm: no φ, no gates."""
    config = ModelConfig(**{**SHAPE, "vocab_size": 64})
    T, nsa = 96, NSAConfig(window=24, backend="torch")
    with FlopCounterMode(display=False) as counter:
        NSATransformer(config, nsa)(torch.randint(0, 64, (1, T)))
    counted = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = 4 * 4 * 8 * sum(min(24, t + 1) for t in range(T))
    assert window_attention_flops(T, config, 24) == attention
    beyond_attention = model_flops_per_sequence(T, config, nsa, training=False) - config.num_layers * attention
    assert counted["mm"] + counted.get("addmm", 0) == beyond_attention
