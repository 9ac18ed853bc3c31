"""bench/learning.py, the learning study, at its CPU size: every model trained by the trainer on data=stdlib,
the results file with its held-out loss by position, and a later call merged into the day's file."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def study(tmp_path, *extra):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "learning.py"), "--tiny", "--results-dir",
                           str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), *extra],
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = (tmp_path / "results").glob("*/learning_cpu.json")
    return json.loads(path.read_text()), path


def test_the_tiny_study_trains_every_model_and_records_its_held_out_loss_by_position(tmp_path):
    record, path = study(tmp_path)
    assert record["kind"] == "learning" and record["card"] == "cpu" and len(record["commands"]) == 1
    data = record["data"]
    assert data["kind"] == "files" and data["glob"] == "**/*.py"
    assert data["train_documents"] > data["eval_documents"] > 0 and data["eval_bytes"] > 0
    results = {r["model"]: r for r in record["results"]}
    assert list(results) == ["nsa", "dense", "window", "dense_matched"]
    for r in results.values():
        assert r["seq_len"] == 256 and r["steps"] == 3 and r["tokens"] == 3 * 2 * 256 and r["seconds"] > 0
        assert [(b["start"], b["end"]) for b in r["loss_by_position"]] == [(0, 64), (64, 256)]
        assert all(0 < b["loss"] < 6 for b in r["loss_by_position"]) and math.isfinite(r["held_out_loss"])
        assert (Path(r["run_dir"]) / "final.pt").is_file()
    # same steps, tokens and seed; parameters: dense == window < NSA, dense_matched within 2 % of NSA
    assert len({(r["steps"], r["tokens"], r["seed"]) for r in results.values()}) == 1
    assert results["dense"]["parameters"] == results["window"]["parameters"] < results["nsa"]["parameters"]
    assert abs(results["dense_matched"]["parameters"] / results["nsa"]["parameters"] - 1) < 0.02
    assert results["dense_matched"]["intermediate_size"] > results["dense"]["intermediate_size"]
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    again, _ = study(tmp_path, "--models", "window")
    assert [r["model"] for r in again["results"]] == ["nsa", "dense", "window", "dense_matched"]
    assert len(again["commands"]) == 2
    assert {r["model"]: r for r in again["results"]}["nsa"] == results["nsa"]
