"""`python -m nsa_dist.eval RUN/final.pt`: retrieval accuracy by context length and needle depth, and what the
router selects (nsa_dist.analysis.retrieval says what each number means)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from nsa_dist.analysis.retrieval import evaluate_grid, json_safe, write_heatmap
from nsa_dist.data.tasks import RETRIEVAL_KINDS
from nsa_dist.data.sources import DataConfig
from nsa_dist.training.checkpoint import load_final_model, saved_section

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nsa_dist.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a training run's final.pt")
    p.add_argument("--task", choices=RETRIEVAL_KINDS, default="needle")
    p.add_argument("--lengths", default="256,512", help="context lengths, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (needle task only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=2, help="batches per cell")
    p.add_argument("--query-window", type=int, default=256, help="last queries the distinct-block count reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default=None, help="replace the run's nsa.backend (torch | triton | auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval/ beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model, config, step = load_final_model(args.checkpoint, device=device, backend=args.backend)
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    data = saved_section(config, "data", DataConfig)
    result = evaluate_grid(model, data, vocab_size=config["model"]["vocab_size"], task=args.task, lengths=lengths,
                           depths=depths, batch_size=args.batch_size, batches=args.batches, seed=args.seed,
                           device=device, query_window=args.query_window, progress=not args.no_progress)
    result = {"checkpoint": str(args.checkpoint), "step": step, **result, "model": config["model"], "nsa": config["nsa"]}
    out = args.out or args.checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_eval.json").write_text(json.dumps(json_safe(result), indent=1))
    write_heatmap(result, out / "retrieval_heatmap.png")
    for cell in result["cells"]:
        hits = " ".join(f"L{row['layer']} hit {row['needle_hit']:.2f}" for row in cell["layers"])
        depth = "" if cell["depth"] is None else f" depth {cell['depth']:g}"
        log.info("length %d%s: accuracy %.3f  %s", cell["length"], depth, cell["accuracy"], hits)
    log.info("wrote %s and %s", out / "retrieval_eval.json", out / "retrieval_heatmap.png")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
