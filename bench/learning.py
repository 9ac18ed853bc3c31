"""Does NSA learn real text, and where in the sequence does it gain? NSA against dense, sliding-window and
parameter-matched dense attention, on held-out Python standard-library sources.

Each model trains with the project's trainer (`python -m nsa_dist.train`'s `main`) on `data=stdlib` for
the same steps, tokens and seed; only the attention differs, and `dense_matched` is dense attention
with a wider MLP (`model.intermediate_size` computed here) so that its parameter count matches NSA's
within 2 %. Then each run's held-out loss by position (nsa_dist.analysis.positions) is measured on the
eval split (files never trained on). Writes `<results-dir>/<date>/learning_<card>.json` (docs/learning.md
gives the format) and `learning_<card>.png`, the loss by position of every model and length; a later
call adds its entries to the day's file, replacing those of the same model and length.

On one H200, `model=small nsa=paper`, 8k tokens: 2000 steps of 8 sequences (131M tokens, about 4.4
passes over the 30 MB training split). The trainer runs NSA at about 443k tokens/s and dense at about
744k at 8k, so NSA trains in about 5 min and dense in about 3; with start-up, Triton compilation and
evaluation each run stays under 9 min. One model per command:

    for m in nsa dense window dense_matched; do
      python bench/learning.py --seq-len 8192 --models $m --results-dir bench/results
    done

At 32k, 1500 steps of 2 sequences (98M tokens). Extrapolated from the FLOPs (dense costs 2.8x its 8k
FLOPs per token, NSA 1.26x), dense takes about 6-7 min and NSA about 5; not yet measured:

    for m in nsa dense window dense_matched; do
      python bench/learning.py --seq-len 32768 --steps 1500 --models $m --results-dir bench/results
    done

On CPU, a minute, for the tests: `python bench/learning.py --tiny --results-dir /tmp/learning`.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from learn_retrieval import card_name
from nsa_dist.analysis.positions import write_plot
from nsa_dist.config import run_config
from nsa_dist.data.sources import split_sizes
from nsa_dist.nn.build import build_model
from nsa_dist.positions import evaluate_run
from nsa_dist.train import main as train

MODELS = ("nsa", "dense", "window", "dense_matched")
MATCH_TOLERANCE = 0.02
# A CPU-sized study: every model, a few steps, two position buckets.
TINY = dict(preset="tiny", nsa="tiny", trainer="cpu", seq_len="256", steps=3, batch_tokens=512, eval_batches=1,
            eval_batch_size=2, first_bucket=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", default="8192", help="sequence lengths, comma-separated")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per step: batch size = this / length")
    p.add_argument("--preset", default="small", help="model= preset")
    p.add_argument("--nsa", default="paper", help="nsa= preset")
    p.add_argument("--trainer", default="gpu", help="trainer= preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16, help="loss by position: batches per run")
    p.add_argument("--eval-batch-size", type=int, default=4, help="loss by position: windows per batch")
    p.add_argument("--first-bucket", type=int, default=512, help="end of the first position bucket")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another trainer override for every run (repeatable), e.g. --set trainer.lr=1e-3")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/learning"), help="where the runs are written")
    p.add_argument("--results-dir", type=Path, default=None, help="write DIR/<date>/learning_<card>.json and .png")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized study: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()))
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown --models {', '.join(sorted(unknown))}: choose from {', '.join(MODELS)}")
    return args


def compose_run(overrides: list[str]):
    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def parameter_count(run) -> int:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        return build_model(run.model, run.nsa).num_parameters()


def matched_intermediate_size(nsa_run) -> int:
    """The SwiGLU width (a multiple of 8) at which dense attention has NSA's parameter count; raises if no
    width comes within MATCH_TOLERANCE."""
    target = parameter_count(nsa_run)
    dense = replace(nsa_run, model=replace(nsa_run.model, attention="dense"))
    per_unit = 3 * nsa_run.model.hidden_size * nsa_run.model.num_layers  # gate, up and down: one row or column each
    width = dense.model.ffn_size + 8 * round((target - parameter_count(dense)) / per_unit / 8)
    matched = parameter_count(replace(dense, model=replace(dense.model, intermediate_size=width)))
    if abs(matched - target) > MATCH_TOLERANCE * target:
        raise ValueError(f"dense with model.intermediate_size={width} has {matched} parameters, NSA {target}: "
                         f"not within {MATCH_TOLERANCE:.0%}")
    return width


def overrides_for(args, model: str, seq_len: int, width: int | None) -> list[str]:
    attention = "dense" if model == "dense_matched" else model
    return [f"model={args.preset}", f"nsa={args.nsa}", f"trainer={args.trainer}", "data=stdlib",
            f"data.seq_len={seq_len}", f"model.attention={attention}", f"trainer.steps={args.steps}",
            f"trainer.batch_size={max(1, args.batch_tokens // seq_len)}", f"trainer.seed={args.seed}",
            "trainer.checkpoint_every=0", *([f"model.intermediate_size={width}"] if width else []), *args.set]


def describe_data(run) -> dict:
    """What the study read: the directory, and both splits' files and bytes."""
    return {"kind": run.data.kind, "path": run.data.path, "glob": run.data.glob, "exclude": list(run.data.exclude),
            "holdout": run.data.holdout, "python": platform.python_version(),
            **split_sizes(run.data, vocab_size=run.model.vocab_size)}


def study_one(args, model: str, seq_len: int, width: int | None, run_dir: Path) -> dict:
    """Train one model at one length, then measure its held-out loss by position."""
    overrides = overrides_for(args, model, seq_len, width)
    run = run_config(compose_run(overrides))
    started = time.perf_counter()
    result = train(compose_run(overrides), run_dir=run_dir)
    seconds = time.perf_counter() - started
    device = torch.device("cuda" if run.trainer.device != "cpu" and torch.cuda.is_available() else "cpu")
    positions = evaluate_run(result.checkpoint, label=f"{model} {seq_len}", device=device, precision="auto",
                             batch_size=args.eval_batch_size, batches=args.eval_batches,
                             first_bucket=args.first_bucket, growth=4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = run.trainer.steps * run.trainer.batch_size * seq_len
    return {"model": model, "attention": run.model.attention, "seq_len": seq_len,
            "held_out_loss": positions["loss"], "loss_by_position": positions["buckets"],
            "eval_loss": result.eval_metrics.get("loss"), "final_train_loss": result.losses[-1],
            "steps": run.trainer.steps, "batch_size": run.trainer.batch_size, "tokens": tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(result.tokens_per_s),
            "parameters": parameter_count(run), "intermediate_size": run.model.ffn_size, "seed": run.trainer.seed,
            "eval_windows": positions["windows"], "overrides": overrides, "run_dir": str(run_dir)}


def merge(path: Path, record: dict) -> dict:
    """`record` added to the file at `path`: its entries replace those of the same model and length."""
    if not path.exists():
        return record
    old = json.loads(path.read_text())
    new_keys = {(r["model"], r["seq_len"]) for r in record["results"]}
    kept = [r for r in old.get("results", []) if (r["model"], r["seq_len"]) not in new_keys]
    order = {m: i for i, m in enumerate(MODELS)}
    results = sorted(kept + record["results"], key=lambda r: (r["seq_len"], order.get(r["model"], len(order))))
    return {**record, "commands": old.get("commands", []) + record["commands"], "results": results}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lengths = [int(n) for n in args.seq_len.split(",")]
    models = args.models.split(",")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    first = run_config(compose_run(overrides_for(args, "nsa", lengths[0], None)))
    record = {"kind": "learning", "date": date.today().isoformat(), "card": card_name(
        "cuda" if first.trainer.device != "cpu" and torch.cuda.is_available() else "cpu"),
        "torch": torch.__version__, "commands": ["python bench/learning.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))],
        "data": describe_data(first), "results": []}
    for seq_len in lengths:
        nsa_run = run_config(compose_run(overrides_for(args, "nsa", seq_len, None)))
        width = matched_intermediate_size(nsa_run) if "dense_matched" in models else None
        for model in models:
            entry = study_one(args, model, seq_len, width if model == "dense_matched" else None,
                              args.runs_dir / stamp / f"{model}_{seq_len}")
            record["results"].append(entry)
            logging.info("%s at %d: held-out loss %.4f, %d parameters, %.0f s", model, seq_len,
                         entry["held_out_loss"], entry["parameters"], entry["seconds"])
    buckets = [b["label"] for b in record["results"][0]["loss_by_position"]]
    print("\n| model | seq_len | held-out loss | " + " | ".join(buckets) + " | parameters | seconds |")
    print("|---" * (len(buckets) + 5) + "|")
    for r in record["results"]:
        print(f"| {r['model']} | {r['seq_len']} | {r['held_out_loss']:.4f} | "
              + " | ".join(f"{b['loss']:.4f}" for b in r["loss_by_position"]) + f" | {r['parameters']} | {r['seconds']} |")
    if args.results_dir:
        path = args.results_dir / record["date"] / f"learning_{record['card']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = merge(path, record)
        path.write_text(json.dumps(record, indent=1))
        runs = [{"label": f"{r['model']} {r['seq_len']}", "buckets": r["loss_by_position"]} for r in record["results"]]
        write_plot(runs, path.with_suffix(".png"), title="held-out loss by position, Python standard library")
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
