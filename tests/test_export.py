"""Taking a trained model home: `generate()` on a converted model, `python -m nsa_dist.export` of a
`model=hf_llama` run, and `save_pretrained` of a converted model, each loaded back with the Hugging Face
classes and `convert_attention(model, pretrained=dir)` to identical logits."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nsa_dist import NSAConfig, convert_attention  # noqa: E402
from nsa_dist.train import main  # noqa: E402
from nsa_dist.training.checkpoint import load_final_model  # noqa: E402

NSA = NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=32, backend="torch")
VOCAB = 97


def tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=1024)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval(), config


def test_generate_on_a_converted_model_is_the_argmax_loop_over_the_full_forward():
    model, _ = tiny_llama()
    model = convert_attention(model, NSA, gate_init="uniform")
    prompt = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # past the window
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(12):
            expected = torch.cat([expected, model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)


def test_converting_leaves_the_callers_config_alone():
    model, config = tiny_llama()
    before = config.to_dict()
    convert_attention(model, NSA)
    assert config.to_dict() == before
    second = transformers.LlamaForCausalLM(config)  # a second model from the same config stays dense and runs
    assert second(input_ids=torch.randint(0, VOCAB, (1, 16))).logits.shape == (1, 16, VOCAB)


def test_save_pretrained_of_a_converted_model_round_trips(tmp_path):
    model, _ = tiny_llama()
    model = convert_attention(model, NSA, gate_init="uniform")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." in name or ".compress_" in name:
                p.add_(torch.randn_like(p) * 0.1)  # trained NSA parameters, not their init
    ids = torch.randint(0, VOCAB, (1, 96))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = convert_attention(transformers.LlamaForCausalLM.from_pretrained(tmp_path), pretrained=tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    fresh = convert_attention(transformers.LlamaForCausalLM.from_pretrained(tmp_path), NSA, gate_init="uniform")
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, expected)  # the NSA weights did matter
    plain, _ = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no nsa_config"):
        convert_attention(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain"), pretrained=tmp_path / "plain")


def test_an_hf_llama_run_exports_to_a_directory_hugging_face_loads(compose_config, tmp_path):
    run_dir = tmp_path / "run"
    main(compose_config("model=hf_llama", "model.hidden_size=64", "model.head_dim=16", "data.seq_len=128",
                        "trainer.steps=3", "trainer.batch_size=2", "trainer.eval_batch_size=2",
                        "trainer.progress_bar=false", "trainer.device=cpu"), run_dir=run_dir)
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "nsa_dist.export", str(run_dir / "final.pt"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "convert_attention(model, pretrained=" in done.stdout
    assert json.loads((out / "config.json").read_text())["nsa_config"]["window"] == 64
    trained, _, _ = load_final_model(run_dir / "final.pt", backend="torch")
    reloaded = convert_attention(transformers.LlamaForCausalLM.from_pretrained(out), pretrained=out)
    ids = torch.randint(0, 256, (1, 128))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(ids))
    again = subprocess.run([sys.executable, "-m", "nsa_dist.export", str(run_dir / "final.pt"), str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("nsa_dist.export: error: ")
    assert "--overwrite" in again.stderr
