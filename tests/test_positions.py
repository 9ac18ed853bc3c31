"""Loss by position (nsa_dist.analysis.positions, python -m nsa_dist.positions): bucket means against a hand
computation, and the command on two trained runs."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

from nsa_dist.analysis.positions import bucket_edges, loss_by_position
from nsa_dist.data.sources import EVAL_SEED_OFFSET, DataConfig, build_source

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_buckets_grow_by_four_from_512_to_the_sequence_length():
    assert bucket_edges(32768) == [0, 512, 2048, 8192, 32768]
    assert bucket_edges(8192) == [0, 512, 2048, 8192]
    assert bucket_edges(10000) == [0, 512, 2048, 8192, 10000]
    assert bucket_edges(300) == [0, 300]
    assert bucket_edges(256, first=64) == [0, 64, 256]


class KnownLoss(torch.nn.Module):
    """Puts logit `t % 5` on the next byte of a counting file (byte i is i % 256) and 0 elsewhere, so the loss
    at position t is log(e^(t % 5) + 255) - t % 5."""

    def forward(self, tokens):
        B, T = tokens.shape
        logits = torch.zeros(B, T, 256)
        logits.scatter_(2, ((tokens + 1) % 256)[..., None], (torch.arange(T) % 5).float().expand(B, T)[..., None])
        return logits


def test_bucket_means_are_the_hand_computed_means_of_the_per_token_losses(tmp_path):
    path = tmp_path / "counting.bin"
    path.write_bytes(bytes(range(256)) * 16)
    data = DataConfig(kind="text", seq_len=64, path=str(path))
    result = loss_by_position(KnownLoss(), data, vocab_size=256, edges=[0, 8, 32, 64], batch_size=3, batches=2,
                              seed=0, device="cpu")
    per_token = [math.log(math.exp(t % 5) + 255) - t % 5 for t in range(64)]
    expected = [sum(per_token[a:b]) / (b - a) for a, b in ((0, 8), (8, 32), (32, 64))]
    assert [(b["start"], b["end"], b["label"]) for b in result["buckets"]] == [(0, 8, "0-8"), (8, 32, "8-32"),
                                                                               (32, 64, "32-64")]
    assert np.allclose([b["loss"] for b in result["buckets"]], expected, rtol=1e-6)
    assert math.isclose(result["loss"], sum(per_token) / 64, rel_tol=1e-6) and result["windows"] == 6


def train_tiny(run_dir, data_file, attention):
    overrides = ["data=text", f"data.path={data_file}", "data.seq_len=256", f"model.attention={attention}",
                 "model.num_layers=1", "trainer.steps=3", "trainer.batch_size=2", "trainer.eval_every=0",
                 "trainer.eval_batch_size=2", "trainer.progress_bar=false", "trainer.device=cpu",
                 f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "nsa_dist.train", *overrides], capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "final.pt"


def test_positions_command_writes_several_runs_into_one_json_and_one_plot(tmp_path):
    from nsa_dist.training.checkpoint import load_final_model

    data_file = tmp_path / "corpus.txt"
    data_file.write_bytes(b"".join(f"line {i}: the value is {i * i % 97}.\n".encode() for i in range(600)))
    checkpoints = [train_tiny(tmp_path / name, data_file, name) for name in ("nsa", "window")]
    out = tmp_path / "positions"
    done = subprocess.run([sys.executable, "-m", "nsa_dist.positions", *map(str, checkpoints), "--out", str(out),
                           "--first-bucket", "64", "--batches", "2", "--batch-size", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "loss_by_position.json").read_text())
    assert result["edges"] == [0, 64, 256] and [r["label"] for r in result["runs"]] == ["nsa", "window"]
    assert (out / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run, checkpoint in zip(result["runs"], checkpoints):
        assert run["attention"] == run["label"] and run["step"] == 3 and run["windows"] == 4
        # by hand: the run's held-out windows (its eval split, the trainer's eval seed), token by token
        model, config, _ = load_final_model(checkpoint)
        data = DataConfig(**config["data"])
        source = build_source(data, vocab_size=256, split="eval",
                              generator=torch.Generator().manual_seed(config["trainer"]["seed"] + EVAL_SEED_OFFSET))
        losses = []
        with torch.no_grad():
            for _ in range(2):
                batch = source.sample(2)
                logits = model(batch.inputs)
                losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets,
                                                                reduction="none"))
        losses = torch.cat(losses)  # (4, 256)
        expected = [losses[:, :64].mean().item(), losses[:, 64:].mean().item()]
        assert np.allclose([b["loss"] for b in run["buckets"]], expected, rtol=1e-5)
        assert math.isclose(run["loss"], losses.mean().item(), rel_tol=1e-5)
