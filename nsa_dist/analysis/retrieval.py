"""Retrieval evaluation of a trained model: answer accuracy over context lengths and needle depths, and what
the NSA layers select while answering.

    python -m nsa_dist.eval outputs/RUN/final.pt --lengths 256,512,1024 --depths 0,0.25,0.5,0.75,1
    python -m nsa_dist.eval outputs/RUN/final.pt --task mqar --lengths 512,1024

Loads `final.pt` (its run config under "config" rebuilds the model and the task's token layout), runs
the needle task (or MQAR) at every (length, depth) cell on fresh batches, and writes
`retrieval_eval.json` and `retrieval_heatmap.png` into `--out` (default: `eval/` beside the
checkpoint). Per cell and NSA layer it reports (nsa_dist.analysis.selection_stats):

    needle_hit               share of (answer, KV head) whose query selected the block holding the
                             answer's source token; _correct / _wrong split it by the answer's outcome
    needle_forced            share of those where that block is forced (initial or local): a hit for free
    needle_hit_free          the hit rate where it is not forced: what the router found by itself
    distinct_free_blocks     different blocks picked beyond the forced ones by the last --query-window
                             queries, per sequence and KV head; _fraction: of the blocks free to pick
    forced_mass              share of the router's probability on forced blocks (near 1: collapsed)
    gate_compressed|selected|window   mean gate of each branch

`retrieval_metrics` computes the same numbers on one batch for the trainer's periodic evaluation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nsa_dist.analysis.selection_stats import (SelectionRecorder, distinct_free_blocks, gate_means,
                                               mean_forced_mass, needle_hits)
from nsa_dist.data.sources import EVAL_SEED_OFFSET, DataConfig, build_source
from nsa_dist.data.tasks import RETRIEVAL_KINDS

log = logging.getLogger(__name__)

LAYER_STATS = ("needle_hit", "needle_hit_correct", "needle_hit_wrong", "needle_forced", "needle_hit_free",
               "distinct_free_blocks", "distinct_free_fraction", "forced_mass", "gate_compressed", "gate_selected",
               "gate_window")
# Different streams for different cells, all fixed by --seed.
CELL_SEED_STRIDE = 7_919


def _logits(output) -> torch.Tensor:
    return getattr(output, "logits", output)  # a Hugging Face model returns an output object


@torch.no_grad()
def _batch_stats(model: torch.nn.Module, source, batch_size: int, device, query_window: int) -> dict:
    """Answer outcomes and each NSA layer's raw statistics on one fresh batch of `source`."""
    batch, sources = source.sample_with_sources(batch_size)
    batch = batch.to(device)
    with SelectionRecorder(model) as recorder:
        logits = _logits(model(batch.inputs))
    mask = batch.answer_mask
    correct = (logits.argmax(-1) == batch.targets)[mask]  # answers in mask.nonzero() order
    exact = ((logits.argmax(-1) == batch.targets) | ~mask).all(1)
    layers = []
    for record in recorder.layers:
        hits = needle_hits(record, sources.to(device), mask)
        layers.append({"hit": hits["hit"].cpu(), "forced": hits["forced"].cpu(),
                       **distinct_free_blocks(record, query_window),
                       "forced_mass": mean_forced_mass(record, query_window),
                       **{f"gate_{name}": value for name, value in gate_means(record).items()}})
    return {"correct": correct.cpu(), "exact": exact.cpu(), "layers": layers}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _share(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else math.nan


def summarize(parts: list[dict]) -> dict:
    """Accuracy and per-layer statistics over the batches of one cell."""
    correct = torch.cat([p["correct"] for p in parts])
    out = {"accuracy": _share(correct), "exact": _share(torch.cat([p["exact"] for p in parts])),
           "answers": int(correct.numel()), "layers": []}
    for i in range(len(parts[0]["layers"])):
        per_batch = [p["layers"][i] for p in parts]
        hit = torch.cat([b["hit"] for b in per_batch])  # (answers, H)
        forced = torch.cat([b["forced"] for b in per_batch])
        row = {"layer": i, "needle_hit": _share(hit), "needle_hit_correct": _share(hit[correct]),
               "needle_hit_wrong": _share(hit[~correct]), "needle_forced": _share(forced),
               "needle_hit_free": _share(hit[~forced])}
        for key in ("distinct_free_blocks", "distinct_free_fraction", "forced_mass", "gate_compressed",
                    "gate_selected", "gate_window"):
            if key in per_batch[0]:
                row[key] = _mean(b[key] for b in per_batch)
        out["layers"].append(row)
    return out


def retrieval_metrics(model: torch.nn.Module, data_cfg: DataConfig, *, vocab_size: int, device, batch_size: int,
                      generator: torch.Generator, query_window: int = 256) -> dict[str, float]:
    """Answer accuracy and per-layer selection statistics on one batch of the run's retrieval task, flat for
    TensorBoard (`retrieval_accuracy`, `needle_hit/layer0`, ...; undefined values are left out).

    The model runs on whole sequences without sequence parallelism; its train/eval mode is restored."""
    if data_cfg.kind not in RETRIEVAL_KINDS:
        raise ValueError(f"retrieval metrics need data=mqar or data=needle, got data={data_cfg.kind}")
    was_training = model.training
    model.eval()
    try:
        source = build_source(data_cfg, vocab_size=vocab_size, generator=generator)
        cell = summarize([_batch_stats(model, source, batch_size, device, query_window)])
    finally:
        model.train(was_training)
    flat = {"retrieval_accuracy": cell["accuracy"], "retrieval_exact": cell["exact"]}
    for row in cell["layers"]:
        flat.update({f"{key}/layer{row['layer']}": row[key] for key in LAYER_STATS if key in row})
    return {k: float(v) for k, v in flat.items() if not math.isnan(v)}


def run_retrieval_metrics(run, model: torch.nn.Module, *, device, sp=None) -> dict[str, float]:
    """`retrieval_metrics` for the trainer's evaluation of run config `run` (a RunConfig), on the windows
    of its eval batch; nothing for other data kinds, or under sequence parallelism (the statistics read
    whole sequences)."""
    if run.data.kind not in RETRIEVAL_KINDS or sp is not None:
        return {}
    return retrieval_metrics(model, run.data, vocab_size=run.model.vocab_size, device=device,
                             batch_size=run.trainer.eval_batch_size,
                             generator=torch.Generator().manual_seed(run.trainer.seed + EVAL_SEED_OFFSET))


def evaluate_grid(model: torch.nn.Module, data: DataConfig, *, vocab_size: int, task: str, lengths: list[int],
                  depths: list[float], batch_size: int, batches: int, seed: int, device, query_window: int,
                  progress: bool = True) -> dict:
    """Every (length, depth) cell of the task, on the token layout of `data` (the run's data section)."""
    base = replace(data, kind=task)
    columns = depths if task == "needle" else [None]
    cells = []
    bar = tqdm(total=len(lengths) * len(columns) * batches, desc="eval", disable=not progress, dynamic_ncols=True)
    with bar:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(columns):
                cfg = replace(base, seq_len=length)
                if depth is not None:
                    cfg = replace(cfg, depth_min=depth, depth_max=depth)
                generator = torch.Generator().manual_seed(seed + CELL_SEED_STRIDE * (i * len(columns) + j + 1))
                source = build_source(cfg, vocab_size=vocab_size, generator=generator)
                parts = []
                for _ in range(batches):
                    parts.append(_batch_stats(model, source, batch_size, device, query_window))
                    bar.update()
                cells.append({"length": length, "depth": depth, **summarize(parts)})
                bar.set_postfix(length=length, depth=depth, acc=f"{cells[-1]['accuracy']:.2f}")
    grid = [[c["accuracy"] for c in cells[i * len(columns):(i + 1) * len(columns)]] for i in range(len(lengths))]
    return {"task": task, "lengths": lengths, "depths": columns, "accuracy": grid,
            "chance": 1.0 / base.value_vocab, "batch_size": batch_size, "batches": batches, "seed": seed,
            "query_window": query_window, "data": asdict(base), "cells": cells}


def write_heatmap(result: dict, path: Path) -> None:
    """Accuracy over length x depth, annotated; beside it the needle-block hit rate (mean over NSA layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["lengths"], result["depths"]
    cols = len(depths)
    hit = [[_mean(l["needle_hit"] for l in c["layers"]) for c in result["cells"][i * cols:(i + 1) * cols]]
           for i in range(len(lengths))]
    panels = [("answer accuracy", result["accuracy"])]
    if any(c["layers"] for c in result["cells"]):
        panels.append(("needle block selected (mean over layers, heads)", hit))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * cols * len(panels), 1.2 + 0.6 * len(lengths)),
                             squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        shown = [[math.nan if v is None else v for v in row] for row in values]
        image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for r, row in enumerate(shown):
            for c, v in enumerate(row):
                ax.text(c, r, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="black" if not math.isnan(v) and v > 0.6 else "white", fontsize=9)
        ax.set_xticks(range(cols), ["all" if d is None else f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth" if result["task"] == "needle" else "queries")
        ax.set_ylabel("context length")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.05)
    step = result.get("step")
    fig.suptitle(f"{result['task']}{'' if step is None else f', step {step}'}, chance {result['chance']:.3f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
