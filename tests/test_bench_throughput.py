"""bench/train_throughput.py at CPU sizes, run as a user runs it; and an out-of-memory variant's row."""
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "train_throughput.py"
LENGTHS = (128, 256)


def run_bench(tmp_path: Path, variants: str, *extra: str) -> tuple[dict, str]:
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--seq-lens", ",".join(map(str, LENGTHS)), "--variants", variants,
           "--steps", "2", "--warmup", "1", "--json", str(report_path), "--results-dir", str(tmp_path / "results"),
           *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the rows checked here are the CPU ones
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert done.returncode == 0, f"the benchmark failed:\n{done.stdout[-3000:]}"
    return json.loads(report_path.read_text()), done.stdout


@pytest.mark.parametrize("variants, baseline, extra", [
    ("nsa,dense", "dense", ()),
    # the converted HF model through the checkpointing and chunked-loss paths the 64k GPU run takes
    ("hf_nsa,hf_sdpa", "hf_sdpa", ("--checkpointing", "--loss-chunk", "100")),
], ids=["project_model", "hf_llama"])
def test_rows_ratios_and_table(tmp_path, variants, baseline, extra):
    if variants.startswith("hf_"):
        pytest.importorskip("transformers")
    report, stdout = run_bench(tmp_path, variants, *extra)
    names = variants.split(",")

    assert report["card"] == "cpu"
    assert set(report["versions"]) >= {"torch", "triton", "transformers"}
    assert "--variants" in report["command"] and variants in report["command"]
    rows = {(r["seq_len"], r["variant"]): r for r in report["rows"]}
    assert len(report["rows"]) == len(rows) == len(LENGTHS) * len(names)
    assert set(rows) == {(n, v) for n in LENGTHS for v in names}

    # seq_len, precision (fp32 on a CPU), variant
    table_rows = {(cells[0], cells[2]) for line in stdout.splitlines() if len(cells := line.split()) > 3
                  and cells[1] == "fp32"}
    for (seq_len, variant), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0
        assert row["peak_memory_bytes"] > 0 and "RSS" in row["peak_memory_source"]
        assert row["mfu"] is None  # no known peak for a CPU
        base = rows[(seq_len, baseline)]
        assert row["ratio"] == pytest.approx(row["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
        if variant == baseline:
            assert row["ratio"] == 1.0
        assert (str(seq_len), variant) in table_rows, f"{seq_len} {variant} missing from the table:\n{stdout}"

    dated = tmp_path / "results" / datetime.date.today().isoformat() / "train_throughput_cpu.json"
    assert json.loads(dated.read_text()) == report


def test_out_of_memory_is_recorded_as_oom_not_a_number(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = {"nsa": 2000.0}

    def fake_time_variant(model_cfg, nsa, seq_len, args, device, precision):
        if model_cfg.attention == "dense":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")
        return dict(step_s=seq_len / measured["nsa"], step_s_all=[], tokens_per_s=measured["nsa"],
                    peak_memory_bytes=1, model_tflops_per_s=1.0, mfu=None, parameters=1)

    monkeypatch.setattr(bench, "time_variant", fake_time_variant)
    report = bench.main(["--tiny", "--seq-lens", "128", "--variants", "nsa,dense", "--steps", "1"])
    nsa, dense = report["rows"]
    for key in ("step_s", "tokens_per_s", "peak_memory_bytes", "model_tflops_per_s", "mfu", "ratio"):
        assert dense[key] == "oom", key
    assert "34.00 GiB" in dense["oom_message"]
    assert nsa["tokens_per_s"] == 2000.0 and nsa["ratio"] is None  # no baseline number to divide by
    assert "oom" in capsys.readouterr().out
