"""convert_attention on Hugging Face Llama-family models (tiny random configs, CPU, torch reference ops)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from nsa_dist import NSAConfig, NSATransformer, ModelConfig  # noqa: E402
from nsa_dist.nn import convert as convert_module  # noqa: E402
from nsa_dist.nn.convert import convert_attention, register_adapter  # noqa: E402
from nsa_dist.nn.hf import HFSparseAttention  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

NSA = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=64, backend="torch")
VOCAB = 97
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "own_model.md"


def tiny_config(family: str = "llama", **overrides):
    config_class = getattr(transformers, f"{family.capitalize()}Config")
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, initializer_range=0.1, max_position_embeddings=1024)
    if family == "mistral":
        args["sliding_window"] = None  # Mistral's default 4096-token window is refused (see below)
    return config_class(**{**args, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return getattr(transformers, f"{family.capitalize()}ForCausalLM")(tiny_config(family, **overrides)).eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


FAMILIES = [("llama", {}), ("llama", {"attention_bias": True}), ("mistral", {}), ("qwen2", {}), ("qwen3", {})]


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=["llama", "llama-bias", "mistral", "qwen2", "qwen3"])
def test_short_sequence_logits_equal_the_original(family, overrides):
    if not hasattr(transformers, f"{family.capitalize()}ForCausalLM"):
        pytest.skip(f"this transformers has no {family}")
    original = tiny_model(family, **overrides)
    ids = torch.randint(0, VOCAB, (2, NSA.window))  # as long as the window: the window branch is full attention
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        converted = convert_attention(copy.deepcopy(original), NSA)
        got = converted(input_ids=ids).logits
    attention = [m for m in converted.modules() if isinstance(m, HFSparseAttention)]
    assert len(attention) == 2
    assert rel(got, expected) < 1e-3
    assert rel(got, expected) > 0  # the sparse branches are there, only gated down
    names = {n for n, _ in converted.named_parameters()}
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{part}.weight" in names
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (family == "qwen2" or "attention_bias" in overrides)
    assert {"model.layers.0.self_attn.gate.weight", "model.layers.0.self_attn.compress_k.pos"} <= names
    missing = converted.load_state_dict(original.state_dict(), strict=False).missing_keys
    assert missing and all(re.search(r"\.self_attn\.(gate|compress_[kv])\.", k) for k in missing)


def test_uniform_gates_change_the_model_and_preserve_needs_a_window():
    original = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        got = convert_attention(copy.deepcopy(original), NSA, gate_init="uniform")(input_ids=ids).logits
    assert rel(got, expected) > 1e-2
    with pytest.raises(ValueError, match="window=0 drops that branch"):
        convert_attention(copy.deepcopy(original), NSAConfig(window=0))
    with pytest.raises(ValueError, match="gate_init="):
        convert_attention(copy.deepcopy(original), NSA, gate_init="open")


def test_no_dense_mask_is_built_and_packed_documents_equal_separate_runs(monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface

    def no_mask(*args, **kwargs):
        raise AssertionError("a dense attention mask was built")

    for key in list(AttentionMaskInterface._global_mapping):
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, key, no_mask)
    model = convert_attention(tiny_model(), NSA, gate_init="uniform")  # sparse branches carry weight
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("attention_mask"), kwargs.get("cu_seqlens"))),
        with_kwargs=True)
    lengths = [37, 70, 21]  # the middle one is longer than the window, so all branches see two documents
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs, 1), position_ids=position_ids).logits
        alone = torch.cat([model(input_ids=d).logits for d in docs], 1)
    assert rel(packed, alone) < 1e-5
    mask, cu = seen[0]
    assert mask is None and cu.tolist() == [0, 37, 107, 128]
    with torch.no_grad():
        unpacked = model(input_ids=torch.cat(docs, 1)).logits
    assert rel(unpacked, alone) > 1e-3  # without the boundaries the later documents see the earlier ones


def test_the_model_trains():
    model = convert_attention(tiny_model(), NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=32,
                                                      backend="torch")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(1, 3)  # 48 > window
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_a_model_without_attention_names_what_it_saw():
    with pytest.raises(ValueError, match=r"module types seen: .*Linear.*ReLU.*Sequential"):
        convert_attention(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), NSA)
    with pytest.raises(ValueError, match="matched no attention"):
        convert_attention(tiny_model(), NSA, match=r"no_such_layer")


def test_kv_cache_decoding_is_refused_and_generate_runs_without_one():
    model = convert_attention(tiny_model(), NSA)
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(NotImplementedError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\).*no KV cache"):
        model(input_ids=ids, use_cache=True)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 10)  # tests/test_export.py: exact
    assert model(input_ids=ids).logits.shape == (1, 8, VOCAB)  # plain calls build no cache


def test_unsupported_attention_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn \(MistralAttention\).*sliding window of 32"):
        convert_attention(tiny_model("mistral", sliding_window=32), NSA)
    with pytest.raises(ValueError, match="attention_dropout"):
        convert_attention(tiny_model(attention_dropout=0.1), NSA)
    with pytest.raises(ValueError, match="separate_kv"):
        convert_attention(tiny_model(), NSAConfig(separate_kv=True))
    sinks = tiny_model()
    sinks.model.layers[1].self_attn.sinks = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn.*would drop: sinks"):
        convert_attention(sinks, NSA)


def test_inputs_nsa_cannot_honour_are_refused():
    model = convert_attention(tiny_model(), NSA)
    ids = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=torch.ones(2, 16).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="position_ids must be 0..T-1"):
        model(input_ids=ids, position_ids=torch.arange(16)[None] + 5)
    with pytest.raises(ValueError, match="batch of 1"):
        model(input_ids=ids, position_ids=torch.cat([torch.arange(8), torch.arange(8)])[None].expand(2, 16))
    assert model(input_ids=ids, attention_mask=torch.ones(2, 16)).logits.shape == (2, 16, VOCAB)


def test_nsa_models_stay_and_adapters_can_be_added(monkeypatch):
    own = NSATransformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     head_dim=16), NSA)
    assert convert_attention(own) is own and convert_attention(own, NSA) is own
    with pytest.raises(ValueError, match="NSA already"):
        convert_attention(own, NSAConfig())

    class Mixer(nn.Module):
        def forward(self, x):
            return x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = Mixer()

    monkeypatch.setattr(convert_module, "_adapters", list(convert_module._adapters))
    register_adapter("mixer", finds=lambda m: isinstance(m, Mixer), replace=lambda name, m, nsa, gates: nn.Identity())
    block = convert_attention(Block())
    assert isinstance(block.mix, nn.Identity)
    assert convert_module.registered_adapters()[0].name == "mixer"


def own_model_snippet(path: Path = DOCS) -> str:
    section = path.read_text().split("## Use it in your model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_shows_the_snippet_the_docs_run():
    assert own_model_snippet(ROOT / "README.md") == own_model_snippet()


def sequence_parallel_ranks(rank, world_size, snippet):
    from nsa_dist import causal_lm_loss, parallelize, shard_batch
    from nsa_dist.parallel import SequenceParallel, shard, unshard

    nsa = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=32, backend="torch")
    reference = convert_attention(tiny_model(seed=1), nsa, gate_init="uniform").train()
    model = copy.deepcopy(reference)
    torch.manual_seed(2)
    inputs = torch.randint(0, VOCAB, (1, 128))  # 4x the window: every branch matters
    labels = inputs.clone()
    labels[:, 40:52] = -100  # ignored tokens count neither in the sum nor in the mean
    full = reference(input_ids=inputs, labels=labels)
    full.loss.backward()

    sp = SequenceParallel()
    parallelize(model, sp)  # no supply_global_positions: parallelize hands the shards their positions
    batch = shard_batch({"input_ids": inputs, "labels": labels}, sp)
    local_labels = batch.pop("labels")
    local = model(**batch).logits
    loss = causal_lm_loss(local, local_labels, sp)
    loss.backward()
    logits_error = rel(local.detach(), shard(full.logits.detach(), sp))
    gathered_error = rel(unshard(local.detach(), sp), full.logits.detach())
    loss_error = abs(loss.item() - full.loss.item())
    grad_errors = {}
    for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        g = p.grad.clone()
        torch.distributed.all_reduce(g)
        g /= torch.distributed.get_world_size()  # what DDP, DeepSpeed and nsa_dist's engines do
        grad_errors[name] = (rel(g, ref.grad), g.norm().item(), ref.grad.norm().item())
    with pytest.raises(ValueError, match="global positions"):
        model(input_ids=shard(inputs, sp), position_ids=torch.arange(64)[None])

    # packed documents as Hugging Face collators give them: position_ids restarting at each document
    position_ids = torch.cat([torch.arange(n) for n in (45, 60, 23)])[None]
    with torch.no_grad():
        packed_full = reference(input_ids=inputs, position_ids=position_ids).logits
        packed = shard_batch({"input_ids": inputs, "position_ids": position_ids}, sp)
        packed_labels = packed.pop("labels")
        packed_error = rel(model(**packed).logits, shard(packed_full, sp))
    packed_cu = packed["cu_seqlens"].tolist()
    document_ends_ignored = bool((unshard(packed_labels[..., None], sp)[0, [44, 104, 127], 0] == -100).all())

    exec(compile(snippet, str(DOCS), "exec"), {"__name__": "own_model_snippet"})
    return logits_error, gathered_error, loss_error, grad_errors, packed_error, packed_cu, document_ends_ignored


def test_sequence_parallel_equals_one_process_and_the_docs_snippet_runs():
    for logits_error, gathered_error, loss_error, grad_errors, packed_error, packed_cu, ends_ignored in run_ranks(
            sequence_parallel_ranks, 2, own_model_snippet()):
        assert logits_error < 1e-5 and gathered_error < 1e-5
        assert loss_error < 1e-5  # causal_lm_loss's value is the whole sequence's, on every rank
        # Some of φ's gradients are zero at its init, up to rounding on both sides, so a relative error
        # means nothing there: its MLP's output layer starts at zero (nothing reaches the first layer),
        # and the key side's output bias and position table (through the mean) shift all of a query's
        # compressed scores alike.
        rounding = {n for n, (_, g, ref) in grad_errors.items() if max(g, ref) < 1e-7}
        assert all(re.search(r"compress_[kv]\.mlp\.0\.|compress_k\.(pos|mlp\.2\.bias)", n) for n in rounding), rounding
        worst = max(set(grad_errors) - rounding, key=lambda n: grad_errors[n][0])
        assert grad_errors[worst][0] < 1e-4, (worst, grad_errors[worst])
        assert any("compress_k" in n for n in grad_errors) and any(".gate." in n for n in grad_errors)
        assert packed_cu == [0, 45, 105, 128] and packed_error < 1e-5 and ends_ignored


def test_nsa_dist_imports_no_transformers():
    import subprocess
    import sys

    code = "import sys, nsa_dist, nsa_dist.nn.convert, nsa_dist.nn.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
