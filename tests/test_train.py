import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nsa_dist.train import main
from nsa_dist.training.config import TrainConfig
from nsa_dist.training.loop import NonFiniteLoss, lr_at

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

    state = torch.load(result.checkpoint, weights_only=True)
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


def test_chunked_evaluation_equals_the_whole_batch_at_once(compose_config):
    from nsa_dist.config import run_config
    from nsa_dist.data.sources import build_source
    from nsa_dist.training.engine import TrainEngine
    from nsa_dist.nn.build import build_model
    from nsa_dist.parallel import Mesh
    from nsa_dist.training.loop import evaluate

    run = run_config(compose_config("model.num_layers=1", "data.seq_len=128", "trainer.device=cpu"))
    torch.manual_seed(0)
    model = build_model(run.model, run.nsa)
    engine = TrainEngine(model, torch.optim.AdamW(model.parameters()), grad_clip=1.0, mesh=Mesh(dp_size=1, sp_size=1))
    batch = build_source(run.data, vocab_size=256, generator=torch.Generator().manual_seed(3)).sample(5)
    no_autocast = torch.autocast("cpu", enabled=False)
    whole = evaluate(engine, batch, no_autocast)
    chunked = evaluate(engine, batch, no_autocast, micro_batch_size=2)  # chunks of 2, 2 and 1 rows
    assert whole.keys() == chunked.keys() and set(whole) >= {"loss", "answer_accuracy", "answer_exact"}
    for name in whole:
        assert math.isclose(whole[name], chunked[name], rel_tol=1e-5, abs_tol=1e-6), name


def test_a_non_finite_gradient_leaves_weights_and_optimizer_alone():
    from nsa_dist.training.engine import TrainEngine
    from nsa_dist.parallel import Mesh

    model = torch.nn.Linear(3, 2)
    engine = TrainEngine(model, torch.optim.AdamW(model.parameters(), lr=0.1), grad_clip=1.0, mesh=Mesh(dp_size=1, sp_size=1))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(model(torch.full((1, 3), float("nan"))).sum())
    assert math.isnan(engine.step())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not engine.optimizer.state
    engine.backward(model(torch.ones(1, 3)).sum())
    assert math.isfinite(engine.step(loss_is_finite=False)) and not engine.optimizer.state
    engine.backward(model(torch.ones(1, 3)).sum())
    engine.step()
    assert not torch.equal(before[0], model.weight)


def test_a_run_that_stops_midway_still_carries_its_hparams(compose_config, tmp_path):
    """Written when the run starts: a sweep's failed or resumed runs still sit beside the others in TensorBoard."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = compose_config(*FAST, "trainer.steps=4", "trainer.eval_every=0", "model.num_layers=1", "trainer.lr=1e9",
                         "parallel.sp_size=1")
    with pytest.raises(NonFiniteLoss):
        main(cfg, run_dir=tmp_path)
    content = EventAccumulator(str(tmp_path / "tensorboard")).Reload().PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["trainer.lr"].number_value == 1e9
    assert start.session_start_info.hparams["parallel.sp_size"].number_value == 1


def test_every_evaluation_runs_in_training_sized_chunks(compose_config, tmp_path, monkeypatch):
    """Mid-run and closing evaluations alike: an eval batch larger than a training batch is never one forward."""
    import nsa_dist.training.loop as train_module

    calls = []
    real_evaluate = train_module.evaluate

    def recording_evaluate(*args, **kwargs):
        calls.append((kwargs.get("micro_batch_size"), str(kwargs.get("device"))))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording_evaluate)
    cfg = compose_config(*FAST, "trainer.steps=4", "trainer.eval_every=2", "model.num_layers=1")
    main(cfg, run_dir=tmp_path)
    assert calls == [(2, "cpu"), (2, "cpu")]
