import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nsa_dist.config import TrainConfig
from nsa_dist.train import lr_at, main

FAST = ("trainer.batch_size=2", "data.seq_len=256", "trainer.eval_batch_size=4", "trainer.progress_bar=false",
        "trainer.device=cpu")


def test_tiny_cpu_run_lowers_the_loss_and_writes_its_outputs(compose_config, tmp_path):
    cfg = compose_config(*FAST, "trainer.steps=30", "trainer.eval_every=0", "trainer.warmup_steps=5")
    result = main(cfg, run_dir=tmp_path)

    assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, f"loss went {first:.3f} -> {last:.3f}"
    assert {"loss", "answer_accuracy", "answer_loss"} <= set(result.eval_metrics)
    assert result.tokens_per_s > 0 and result.tokens_per_s_per_device == result.tokens_per_s  # one device

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run dir"
    scalars = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/tokens_per_s", "train/lr", "eval/answer_accuracy"} <= set(scalars)

    state = torch.load(result.checkpoint, weights_only=False)
    assert result.checkpoint == tmp_path / "final.pt" and not (tmp_path / "final.pt.tmp").exists()
    assert state["step"] == 30 and "embed.weight" in state["model"]


def test_same_seed_same_losses(compose_config, tmp_path):
    cfg = compose_config(*FAST, "trainer.steps=3", "trainer.eval_every=0", "model.num_layers=1")
    assert main(cfg, run_dir=tmp_path / "a").losses == main(cfg, run_dir=tmp_path / "b").losses


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, cfg) for step in range(100)]
    assert lrs[0] == 1e-4 and lrs[9] == 1e-3
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert math.isclose(lrs[-1], 1e-4)
