"""build_model (the trainer's one build path), the dense baseline under sequence parallelism, compile."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nsa_dist import ModelConfig, NSAConfig, NSATransformer, build_model, parallelize
from nsa_dist.config import run_config
from nsa_dist.nn.hf import HFSparseAttention
from nsa_dist.train import main
from tests.multirank import run_ranks

NSA = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=16, backend="torch")
SHAPE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
FAST = ("trainer.steps=5", "data.seq_len=256", "trainer.batch_size=2", "trainer.eval_batch_size=2",
        "trainer.progress_bar=false", "trainer.device=cpu")


def test_build_model_gives_logits_for_both_kinds_and_attentions():
    pytest.importorskip("transformers")
    tokens = torch.randint(0, 97, (2, 48))
    counts = {}
    for kind in ("nsa", "hf_llama"):
        for attention in ("nsa", "dense"):
            torch.manual_seed(0)
            model = build_model(ModelConfig(kind=kind, attention=attention, **SHAPE), NSA)
            assert model(tokens).shape == (2, 48, 97), (kind, attention)
            counts[kind, attention] = model.num_parameters()
            converted = [m for m in model.modules() if isinstance(m, HFSparseAttention)]
            assert len(converted) == (2 if (kind, attention) == ("hf_llama", "nsa") else 0)
    # the FLOP count and the data read the ModelConfig, so the HF model must have exactly its shape
    assert counts["nsa", "nsa"] == counts["hf_llama", "nsa"] and counts["nsa", "dense"] == counts["hf_llama", "dense"]
    assert counts["nsa", "dense"] < counts["nsa", "nsa"]
    model = build_model(ModelConfig(kind="hf_llama", **SHAPE), NSA)
    with pytest.raises(NotImplementedError, match="keeps no KV cache"):
        model.causal_lm(input_ids=tokens[:1, :8], use_cache=True)
    with pytest.raises(ValueError, match="kind='gpt'"):
        build_model(ModelConfig(kind="gpt", **SHAPE), NSA)
    with pytest.raises(ValueError, match="pretrained_path is read by kind=hf_llama only"):
        build_model(ModelConfig(pretrained_path="/nowhere", **SHAPE), NSA)


def test_a_local_checkpoint_loads_offline_and_must_match_the_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nsa_dist.nn.build import llama_config

    torch.manual_seed(3)
    saved = transformers.LlamaForCausalLM(llama_config(ModelConfig(**SHAPE)))
    saved.save_pretrained(tmp_path)
    model = build_model(ModelConfig(kind="hf_llama", pretrained_path=str(tmp_path), **SHAPE), NSA)
    assert torch.equal(model.causal_lm.model.layers[1].self_attn.q_proj.weight, saved.model.layers[1].self_attn.q_proj.weight)
    assert isinstance(model.causal_lm.model.layers[1].self_attn, HFSparseAttention)
    with pytest.raises(ValueError, match=r"add model\.hidden_size=32 model\.intermediate_size=128"):
        build_model(ModelConfig(kind="hf_llama", pretrained_path=str(tmp_path), **{**SHAPE, "hidden_size": 64}), NSA)


def test_model_hf_llama_composes_and_trains(compose_config, tmp_path):
    pytest.importorskip("transformers")
    cfg = compose_config("model=hf_llama", *FAST)
    assert run_config(cfg).model.kind == "hf_llama"
    losses = main(cfg, run_dir=tmp_path).losses
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.2, losses


def test_model_hf_llama_trains_under_bf16_autocast(compose_config, tmp_path):
    """trainer.precision=bf16 on the plain torch path: fp32 weights under autocast, the converted model's fp32
    rotary q and k beside bf16 v (which crashed before the ops took the autocast dtype)."""
    pytest.importorskip("transformers")
    losses = main(compose_config("model=hf_llama", "trainer.precision=bf16", *FAST), run_dir=tmp_path).losses
    assert len(losses) == 5 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.2, losses


def test_model_attention_dense_trains(compose_config, tmp_path):
    losses = main(compose_config("model.attention=dense", *FAST), run_dir=tmp_path).losses
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.2, losses


def test_compile_runs_the_blocks_compiled():
    torch.manual_seed(0)
    dense = NSATransformer(ModelConfig(attention="dense", **SHAPE), NSA)
    eager = copy.deepcopy(dense)
    parallelize(dense, None, compile=True)
    assert all(layer._compiled_call_impl is not None for layer in dense.layers)
    tokens = torch.randint(0, 97, (1, 64))
    logits = dense(tokens)
    expected = eager(tokens)
    logits.sum().backward()
    expected.sum().backward()
    assert (logits - expected).norm() / expected.norm() < 1e-5
    for (name, p), q in zip(dense.named_parameters(), eager.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name
    sparse = parallelize(NSATransformer(ModelConfig(**SHAPE), NSA), None, activation_checkpointing=True, compile=True)
    # one checkpointing mechanism for every model: each decoder block wrapped, then the wrapper compiled
    assert all(type(layer).__name__ == "CheckpointWrapper" and layer._compiled_call_impl is not None
               for layer in sparse.layers)


def sharded_against_one_process(model_cfg: ModelConfig, nsa: NSAConfig):
    """On one rank of a 2-rank group: the relative error of logits, gradients and packed logits of `model_cfg`
    parallelized over the group against one process, and the ExchangeStats its layers recorded."""
    from nsa_dist.parallel import ExchangeLog, SequenceParallel, shard, unshard

    torch.manual_seed(0)
    reference = NSATransformer(model_cfg, nsa)
    model = copy.deepcopy(reference)
    tokens = torch.randint(0, 97, (1, 129))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cu = torch.tensor([0, 50, 100, 128])
    full = reference(inputs)
    F.cross_entropy(full.flatten(0, 1), targets.flatten()).backward()
    with torch.no_grad():
        packed_full = reference(inputs, cu_seqlens=cu)

    sp = SequenceParallel()
    log = ExchangeLog()
    parallelize(model, sp, activation_checkpointing=True, exchange_log=log)
    local = model(shard(inputs, sp))
    F.cross_entropy(local.flatten(0, 1), shard(targets, sp).flatten(), reduction="sum").div(targets.numel()).backward()
    errors = {"logits": ((unshard(local.detach(), sp) - full).norm() / full.norm()).item()}
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        g = p.grad.clone()
        torch.distributed.all_reduce(g)
        errors[name] = ((g - ref.grad).norm() / ref.grad.norm()).item()
    with torch.no_grad():
        packed = model(shard(inputs, sp), cu_seqlens=cu)
    errors["packed"] = ((unshard(packed, sp) - packed_full).norm() / packed_full.norm()).item()
    return errors, log.pop()


def dense_ranks(rank, world_size):
    from nsa_dist.parallel import SequenceParallel

    errors, stats = sharded_against_one_process(ModelConfig(attention="dense", **SHAPE), NSA)
    modes = {s.mode for s in stats}
    sp = SequenceParallel()
    transformers = pytest.importorskip("transformers")
    from nsa_dist.nn.build import llama_config

    hf_dense = transformers.LlamaForCausalLM(llama_config(ModelConfig(**SHAPE)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*would see only this rank's shard"):
        parallelize(hf_dense, sp)
    return errors, modes


def test_dense_attention_under_sequence_parallelism_equals_one_process():
    for errors, modes in run_ranks(dense_ranks, 2):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (worst, errors[worst])
        assert modes == {"all_gather"}
