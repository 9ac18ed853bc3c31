"""`python -m nsa_dist.eval RUN/final.pt`: retrieval accuracy by context length and needle depth, and what the
router selects (nsa_dist.analysis.retrieval says what each number means)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from nsa_dist.analysis.retrieval import evaluate_grid, json_safe, write_heatmap
from nsa_dist.data.tasks import RETRIEVAL_KINDS
from nsa_dist.data.sources import DataConfig
from nsa_dist.launch.rank_logging import one_line
from nsa_dist.training.checkpoint import load_final_model, saved_section
from nsa_dist.training.files import CheckpointError

log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit status 2), as every nsa_dist command's are, not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m nsa_dist.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a training run's final.pt")
    p.add_argument("--task", choices=RETRIEVAL_KINDS, default=None,
                   help="default: the task the run trained on (needle when it trained on none of these)")
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
    args = p.parse_args(argv)
    args.lengths_checked, args.depths_checked = _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list[float]]:
    """Each bad argument as argparse's one line (exit 2), before the checkpoint is read."""
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError as e:
        p.error(f"--lengths takes integers and --depths numbers, comma-separated ({e})")
    if any(n <= 0 for n in lengths):
        p.error(f"--lengths must be positive, got {args.lengths}")
    if any(not 0 <= d <= 1 for d in depths):
        p.error(f"--depths are fractions of the context in [0, 1], got {args.depths}")
    for name in ("batch_size", "batches", "query_window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device takes auto, cpu or cuda, got {args.device}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but no CUDA device is visible: use --device cpu (or auto)")
    return lengths, depths


def trained_task(config: dict, asked: str | None) -> tuple[str, str | None]:
    """The task to evaluate and, when the model was not trained on it, the note that says so."""
    trained = config.get("data", {}).get("kind")
    task = asked or (trained if trained in RETRIEVAL_KINDS else "needle")
    if task == trained:
        return task, None
    return task, (f"the model was trained on data.kind={trained}, not {task}: this measures a task it was not "
                  "trained on" + ("" if asked else f" ({trained} has no retrieval grid here; --task picks one)"))


def main(argv=None) -> dict:
    parser_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return evaluate(parser_args)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the same switch as the trainer's: the traceback
            raise
        raise SystemExit(f"nsa_dist.eval: error: {one_line(e)}") from None


def evaluate(args: argparse.Namespace) -> dict:
    lengths, depths = args.lengths_checked, args.depths_checked
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model, config, step = load_final_model(args.checkpoint, device=device, backend=args.backend)
    task, note = trained_task(config, args.task)
    if note:
        log.warning("note: %s", note)
    data = saved_section(config, "data", DataConfig)
    result = evaluate_grid(model, data, vocab_size=config["model"]["vocab_size"], task=task, lengths=lengths,
                           depths=depths, batch_size=args.batch_size, batches=args.batches, seed=args.seed,
                           device=device, query_window=args.query_window, progress=not args.no_progress)
    result = {"checkpoint": str(args.checkpoint), "step": step, "trained_on": config["data"].get("kind"),
              **({"note": note} if note else {}), **result, "model": config["model"], "nsa": config["nsa"]}
    out = args.out or args.checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_eval.json").write_text(json.dumps(json_safe(result), indent=1))
    write_heatmap(result, out / "retrieval_heatmap.png")
    for cell in result["cells"]:
        hits = " ".join(f"L{row['layer']} hit {row['needle_hit']:.2f}" for row in cell["layers"])
        depth = "" if cell["depth"] is None else f" depth {cell['depth']:g}"
        log.info("%s length %d%s: accuracy %.3f  %s", task, cell["length"], depth, cell["accuracy"], hits)
    if note:
        log.warning("note: %s", note)
    log.info("wrote %s and %s", out / "retrieval_eval.json", out / "retrieval_heatmap.png")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
