"""`python -m nsa_dist.positions RUN1/final.pt [RUN2/final.pt ...] --out DIR`: the held-out loss of each run
by position bucket (0-512, 512-2k, 2k-8k, ...), in one JSON and on one plot (nsa_dist.analysis.positions).

Each checkpoint is evaluated on its own run's eval split (`data=text|files|stdlib`: held-out bytes) with
the same windows for runs of the same data section. Writes `DIR/loss_by_position.json`:

    {"first_bucket": 512, "growth": 4, "edges": [0, 512, 2048, 8192],
     "runs": [{"label": "nsa", "checkpoint": "...", "step": 2000, "attention": "nsa", "seq_len": 8192,
               "loss": 0.81, "windows": 64, "eval_documents": 86, "buckets": [{"start": 0, "end": 512,
               "label": "0-512", "loss": 1.02}, ...], "data": {...}, "model": {...}}]}

and `DIR/loss_by_position.png`, one line per run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from nsa_dist.analysis.positions import FIRST_BUCKET, GROWTH, bucket_edges, loss_by_position, write_plot
from nsa_dist.analysis.retrieval import json_safe
from nsa_dist.data.sources import DataConfig
from nsa_dist.training.checkpoint import load_final, load_final_model, saved_section

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nsa_dist.positions", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="training runs' final.pt")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--labels", default=None, help="one name per checkpoint, comma-separated "
                                                  "(default: the run directory's name)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--batches", type=int, default=16, help="batches per run")
    p.add_argument("--first-bucket", type=int, default=FIRST_BUCKET, help="end of the first bucket")
    p.add_argument("--growth", type=int, default=GROWTH, help="each bucket ends this many times further")
    p.add_argument("--seed", type=int, default=None, help="eval stream seed (default: each run's trainer.seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on a GPU, fp32 on CPU")
    p.add_argument("--backend", default=None, help="replace the runs' nsa.backend (torch | triton | auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    return p.parse_args(argv)


def evaluate_run(checkpoint: Path, *, label: str, device: torch.device, precision: str, batch_size: int,
                 batches: int, first_bucket: int, growth: int, seed: int | None = None,
                 backend: str | None = None) -> dict:
    """One run's loss by position on its eval split, with what it is (for the JSON)."""
    model, config, step = load_final_model(checkpoint, device=device, backend=backend)
    data = saved_section(config, "data", DataConfig)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    result = loss_by_position(model, data, vocab_size=config["model"]["vocab_size"],
                              edges=bucket_edges(data.seq_len, first=first_bucket, growth=growth),
                              batch_size=batch_size, batches=batches, device=device,
                              seed=config["trainer"]["seed"] if seed is None else seed,
                              autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    return {"label": label, "checkpoint": str(checkpoint), "step": step, "attention": config["model"]["attention"],
            **result, "precision": "bf16" if bf16 else "fp32", "data": config["data"], "model": config["model"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = args.labels.split(",") if args.labels else [c.resolve().parent.name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise SystemExit(f"--labels names {len(labels)} runs for {len(args.checkpoints)} checkpoints: give one each")
    for checkpoint in args.checkpoints:
        load_final(checkpoint)  # every file verified before the first is evaluated
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    runs = []
    for checkpoint, label in zip(args.checkpoints, labels):
        runs.append(evaluate_run(checkpoint, label=label, device=device, precision=args.precision,
                                 batch_size=args.batch_size, batches=args.batches, first_bucket=args.first_bucket,
                                 growth=args.growth, seed=args.seed, backend=args.backend))
        log.info("%s: held-out loss %.4f; %s", label, runs[-1]["loss"],
                 "  ".join(f"{b['label']} {b['loss']:.4f}" for b in runs[-1]["buckets"]))
    result = {"first_bucket": args.first_bucket, "growth": args.growth,
              "edges": bucket_edges(max(r["seq_len"] for r in runs), first=args.first_bucket, growth=args.growth),
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_by_position.json").write_text(json.dumps(json_safe(result), indent=1))
    write_plot(runs, args.out / "loss_by_position.png")
    log.info("wrote %s and %s", args.out / "loss_by_position.json", args.out / "loss_by_position.png")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
