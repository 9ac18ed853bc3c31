"""nsa_dist.eval and nsa_dist.analysis.selection_stats: a real trainer run, the CLI's files, and each statistic
against a count made here."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nsa_dist import ModelConfig, NSAConfig, NSATransformer
from nsa_dist.data.sources import DataConfig
from nsa_dist.analysis.retrieval import retrieval_metrics
from nsa_dist.analysis.selection_stats import (LayerSelection, SelectionRecorder, distinct_free_blocks, forced_block_mask,
                                      gate_means, mean_forced_mass, needle_hits)
from nsa_dist.data.tasks import NeedleTask, TokenLayout

SELECT = 32  # conf/nsa/tiny: l=16, d=8, l'=32, n=4 (1 initial + 2 local + 1 chosen), w=64
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_RUN = ["data=needle", "data.seq_len=256", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2",
            "model.num_kv_heads=1", "model.head_dim=16", "trainer.steps=4", "trainer.batch_size=2",
            "trainer.eval_every=2", "trainer.eval_batch_size=4", "trainer.warmup_steps=1",
            "trainer.progress_bar=false", "trainer.device=cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores run slower than one
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("needle_run")
    done = subprocess.run([sys.executable, "-m", "nsa_dist.train", *TINY_RUN, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD, cwd=run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def tiny_model(seed=0, **nsa):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    settings = dict(block_len=16, stride=8, select_size=SELECT, top_n=4, window=64, backend="torch")
    return NSATransformer(config, NSAConfig(**{**settings, **nsa})).eval()


def needle_metrics(model, depth, seq_len=256):
    data = DataConfig(kind="needle", seq_len=seq_len, depth_min=depth, depth_max=depth)
    return retrieval_metrics(model, data, vocab_size=256, device="cpu", batch_size=4,
                             generator=torch.Generator().manual_seed(0))


def test_eval_cli_writes_the_grid_and_a_heatmap(trained_run, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "nsa_dist.eval", str(trained_run / "final.pt"), "--lengths",
                           "128,256", "--depths", "0,0.5,1", "--batch-size", "4", "--batches", "1", "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "retrieval_eval.json").read_text())
    assert result["task"] == "needle" and result["step"] == 4
    assert result["lengths"] == [128, 256] and result["depths"] == [0.0, 0.5, 1.0]
    assert len(result["accuracy"]) == 2 and all(len(row) == 3 for row in result["accuracy"])
    assert all(0.0 <= a <= 1.0 for row in result["accuracy"] for a in row)
    assert [(c["length"], c["depth"]) for c in result["cells"]] == [(n, d) for n in (128, 256) for d in (0, 0.5, 1)]
    for cell in result["cells"]:
        assert cell["answers"] == 4 * 2  # 4 windows, 2 value tokens
        assert [row["layer"] for row in cell["layers"]] == [0, 1]
        for row in cell["layers"]:
            assert 0.0 <= row["needle_hit"] <= 1.0 and 0.0 <= row["needle_forced"] <= 1.0
            assert 0.0 < row["gate_compressed"] < 1.0 and 0.0 < row["gate_window"] < 1.0
            assert row["distinct_free_blocks"] >= 1.0
            assert 0.0 <= row["forced_mass"] <= 1.0 + 1e-6
    # depth 0 puts the needle in the initial block, which every query takes
    assert all(row["needle_hit"] == 1.0 and row["needle_forced"] == 1.0 and row["needle_hit_free"] is None
               for cell in result["cells"] if cell["depth"] == 0 for row in cell["layers"])
    png = (out / "retrieval_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "retrieval_heatmap.png")
    assert pixels.shape[0] > 150 and pixels.shape[1] > 300 and float(pixels[..., :3].std()) > 0.05


def test_training_logs_retrieval_scalars_to_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("eval/retrieval_accuracy", "eval/needle_hit/layer0", "eval/needle_hit/layer1",
                "eval/distinct_free_blocks/layer1", "eval/forced_mass/layer0", "eval/gate_selected/layer1"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
        assert [e.step for e in events.Scalars(tag)] == [1, 3]  # after steps 2 and 4
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("eval/retrieval_accuracy"))
    # the same eval windows as the token metrics
    assert [e.value for e in events.Scalars("eval/retrieval_accuracy")] == \
        pytest.approx([e.value for e in events.Scalars("eval/answer_accuracy")])


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_a_needle_in_a_forced_block_is_always_hit(depth):
    """Depth 0 is the initial block, depth 1 the local blocks of the question: selected whatever the router says."""
    metrics = needle_metrics(tiny_model(), depth)
    for layer in (0, 1):
        assert metrics[f"needle_hit/layer{layer}"] == 1.0
        assert metrics[f"needle_forced/layer{layer}"] == 1.0
        assert f"needle_hit_free/layer{layer}" not in metrics  # no answer left to the router


def test_a_needle_within_top_n_blocks_is_always_hit():
    """With top_n covering every block of the window the needle's block is always selected, at any depth."""
    metrics = needle_metrics(tiny_model(top_n=8), 0.5)
    assert metrics["needle_hit/layer0"] == metrics["needle_hit_free/layer0"] == 1.0
    assert metrics["needle_forced/layer0"] == 0.0


def test_needle_hits_match_a_count_over_the_recorded_ids():
    model = tiny_model(seed=3)
    layout = TokenLayout()
    task = NeedleTask(seq_len=512, value_len=2, depth=(0.1, 0.9), layout=layout,
                      generator=torch.Generator().manual_seed(1))
    batch, sources = task.sample_with_sources(6)
    with SelectionRecorder(model) as recorder, torch.no_grad():
        model(batch.inputs)
    assert len(recorder.layers) == 2
    for record in recorder.layers:
        idx = record.idx.tolist()
        hits = forced = total = 0
        for b, t in batch.answer_mask.nonzero().tolist():
            block = int(sources[b, t]) // SELECT
            own = t // SELECT
            for h in range(record.idx.shape[2]):
                total += 1
                hits += block in idx[b][t][h]
                forced += block == 0 or own - 2 < block <= own
                assert 0 in idx[b][t][h] and own in idx[b][t][h]  # the initial and the query's own block
        got = needle_hits(record, sources, batch.answer_mask)
        assert got["hit"].numel() == total == 6 * 2
        assert int(got["hit"].sum()) == hits and int(got["forced"].sum()) == forced


def test_distinct_free_blocks_on_hand_made_selections():
    # 8 queries, blocks of 2 keys, 1 initial + 1 local block forced, top 3; one sequence, two KV heads.
    # The window (queries 4..7) sits in blocks 2 and 3; head 0 always adds block 1, head 1 the block before its own.
    ids = torch.full((1, 8, 2, 3), -1)
    ids[0, 4:6, 0] = torch.tensor([0, 1, 2])
    ids[0, 6:8, 0] = torch.tensor([0, 1, 3])
    ids[0, 4:6, 1] = torch.tensor([0, 1, 2])
    ids[0, 6:8, 1] = torch.tensor([0, 2, 3])
    record = LayerSelection(idx=ids, forced_mass=torch.full((1, 8), 0.5), gates=None, select_size=2, num_init=1,
                            num_local=1)
    stats = distinct_free_blocks(record, query_window=4)
    assert stats["distinct_free_blocks"] == pytest.approx((1 + 2) / 2)
    # free for some query of the window: block 1 (queries 4..7) and block 2 (queries 6, 7)
    assert stats["distinct_free_fraction"] == pytest.approx(1.5 / 2)
    assert mean_forced_mass(record, query_window=4) == pytest.approx(0.5)
    mask = forced_block_mask(torch.arange(8), 4, 2, 1, 1)
    assert mask[5].tolist() == [True, False, True, False] and mask[7].tolist() == [True, False, False, True]


def test_forced_mass_is_one_while_every_visible_block_is_forced():
    model = tiny_model(seed=1)
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    with SelectionRecorder(model) as recorder, torch.no_grad():
        model(tokens)
    mass = recorder.layers[0].forced_mass  # (B, T)
    assert torch.isnan(mass[:, :15]).all()  # no compressed token is complete before key 15
    early = mass[:, 15:3 * SELECT]  # blocks 0..2: initial and local
    assert torch.allclose(early, torch.ones_like(early))
    later = mass[:, 3 * SELECT:]
    assert ((later > 0) & (later < 1)).all()


def test_gate_means_are_the_sigmoid_of_the_gate():
    model = tiny_model()
    bias = torch.tensor([-1.0, 0.5, 2.0])
    for layer in (m.attn.nsa for m in model.layers):
        torch.nn.init.zeros_(layer.gate.weight)
        layer.gate.bias.data = bias.repeat_interleave(layer.num_heads)  # (branch, head) order
    with SelectionRecorder(model) as recorder, torch.no_grad():
        model(torch.randint(0, 256, (1, 64)))
    for record in recorder.layers:
        means = gate_means(record)
        assert list(means) == ["compressed", "selected", "window"]
        assert list(means.values()) == pytest.approx(torch.sigmoid(bias).tolist())
        assert math.isclose(float(record.gates[0, 5, 1, 0]), float(torch.sigmoid(bias[1])), rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["needle", "mqar"])
def test_retrieval_configs_compose_and_build_their_task(compose_config, kind):
    from nsa_dist.config import run_config
    from nsa_dist.data.sources import build_source
    from nsa_dist.data.tasks import MQARTask

    run = run_config(compose_config(f"data={kind}"))
    assert run.data.kind == kind and run.data.loss_on == "answers"
    source = build_source(run.data, vocab_size=run.model.vocab_size, generator=torch.Generator().manual_seed(0))
    assert isinstance(source, NeedleTask if kind == "needle" else MQARTask)
    batch = source.sample(2)
    assert batch.inputs.shape == (2, 512) and int(batch.answer_mask.sum()) == 2 * (2 if kind == "needle" else 16)
    metrics = retrieval_metrics(tiny_model(), run.data, vocab_size=256, device="cpu", batch_size=2,
                                generator=torch.Generator().manual_seed(0))
    assert 0.0 <= metrics["retrieval_accuracy"] <= 1.0 and "needle_hit/layer1" in metrics


@pytest.mark.parametrize("overrides,match", [
    (["data=mqar", "data.num_pairs=200"], r"data=mqar: .*key_vocab"),
    (["data=needle", "data.seq_len=64", "data.num_distractors=40"], r"data=needle: .*num_distractors"),
    (["data=needle", "data.depth_min=0.8", "data.depth_max=0.2"], r"depth_min <= depth_max"),
    (["data=needle", "data.loss_on=keys"], r"unknown data\.loss_on='keys'"),
    (["data=text", "data.path={file}", "data.loss_on=answers"], r"loss_on=answers needs answers"),
])
def test_bad_retrieval_settings_name_the_key(compose_config, tmp_path, overrides, match):
    from nsa_dist.config import run_config

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=match):
        run_config(compose_config(*(o.format(file=text) for o in overrides)))


def test_a_vocabulary_too_small_for_the_ranges_is_refused():
    from nsa_dist.data.sources import build_source

    with pytest.raises(ValueError, match=r"data=needle: .*exceeds vocab_size=128.*model\.vocab_size"):
        build_source(DataConfig(kind="needle"), vocab_size=128, generator=torch.Generator())


def test_learn_retrieval_writes_one_results_file_per_day_and_card(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "learn_retrieval.py"
    spec = importlib.util.spec_from_file_location("learn_retrieval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--seq-len", "32,64", "--steps", "2", "--eval-every", "2", "--batch-size", "2", "--eval-batches", "1",
                "--depths", "0.5", "--hidden", "32", "--results-dir", str(tmp_path)])
    (written,) = tmp_path.glob("*/retrieval_cpu.json")
    record = json.loads(written.read_text())
    assert written.parent.name == record["date"] and record["card"] == "cpu" and record["task"] == "needle"
    assert record["command"].startswith("python bench/learn_retrieval.py --seq-len 32,64")
    rows = {(r["model"], r["seq_len"]): r for r in record["results"]}
    assert set(rows) == {("dense", 32), ("nsa", 32), ("dense", 64), ("nsa", 64)}
    for (model, seq_len), r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 and r["seed"] == 0
        assert r["tokens"] == 2 * 2 * seq_len and r["attention"] == ("dense" if model == "dense" else "nsa")
