"""Held-out loss by position in the sequence: where a model gains or loses against another.

The loss at position `t` is the cross-entropy of predicting token `t + 1` from tokens `0..t` of the
window. Positions fall into buckets that grow by `growth` from `first` (0-512, 512-2k, 2k-8k, 8k-32k, ...;
the last ends at the sequence length), and a bucket's loss is the mean over its positions and over every
window evaluated: a sliding-window model can only match dense attention in the first buckets, so NSA
below the window baseline in the far buckets is what long-range learning looks like.

Windows come from the run's held-out split (`build_source(..., split="eval")` with the trainer's eval
seed), so a `data=text|files|stdlib` run is measured on bytes it never trained on.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nsa_dist.data.batch import Batch
from nsa_dist.data.sources import EVAL_SEED_OFFSET, DataConfig, build_source

FIRST_BUCKET = 512
GROWTH = 4


def bucket_edges(seq_len: int, *, first: int = FIRST_BUCKET, growth: int = GROWTH) -> list[int]:
    """`[0, first, first * growth, ..., seq_len]`: bucket `i` holds positions `edges[i] <= t < edges[i + 1]`."""
    if seq_len <= 0 or first <= 0 or growth < 2:
        raise ValueError(f"need seq_len > 0, first > 0 and growth >= 2, got {seq_len}, {first}, {growth}")
    edges, edge = [0], first
    while edge < seq_len:
        edges.append(edge)
        edge *= growth
    return edges + [seq_len]


def bucket_label(start: int, end: int) -> str:
    def short(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(start)}-{short(end)}"


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of every target, `[B, T]` fp32."""
    logits = model(batch.inputs)
    logits = getattr(logits, "logits", logits)  # a Hugging Face model returns an output object
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none").view_as(
        batch.targets)


def bucket_means(per_position: torch.Tensor, edges: list[int]) -> list[dict]:
    """`[{"start", "end", "label", "loss"}]` for each bucket that holds positions of `per_position [T]`."""
    T = per_position.shape[0]
    return [{"start": a, "end": min(b, T), "label": bucket_label(a, b), "loss": float(per_position[a:min(b, T)].mean())}
            for a, b in zip(edges, edges[1:]) if a < T]


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, data: DataConfig, *, vocab_size: int, edges: list[int], batch_size: int,
                     batches: int, seed: int, device, autocast=None) -> dict:
    """The mean held-out loss per position bucket of `model` (in eval mode) over `batches` batches of
    `batch_size` windows of `data`'s eval split (seed `seed + EVAL_SEED_OFFSET`, the trainer's eval
    stream), and over all positions (`loss`)."""
    source = build_source(data, vocab_size=vocab_size, split="eval",
                          generator=torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))
    total = torch.zeros(data.seq_len, dtype=torch.float64)
    for _ in range(batches):
        with autocast or contextlib.nullcontext():
            losses = token_losses(model, source.sample(batch_size).to(device))  # (B, T)
        total += losses.double().sum(0).cpu()
    per_position = total / (batches * batch_size)
    return {"loss": float(per_position.mean()), "buckets": bucket_means(per_position, edges),
            "windows": batches * batch_size, "seq_len": data.seq_len,
            "eval_documents": len(getattr(source, "documents", ()))}


def write_plot(runs: list[dict], path: Path, *, title: str = "held-out loss by position") -> None:
    """One line per run (`label`, `buckets`) over the position buckets, on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = sorted({b["start"] for run in runs for b in run["buckets"]})
    labels = {b["start"]: b["label"] for run in runs for b in run["buckets"]}
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(starts), 4.0))
    for run in runs:
        at = {b["start"]: b["loss"] for b in run["buckets"]}
        ax.plot(range(len(starts)), [at.get(s, math.nan) for s in starts], marker="o", label=run["label"])
    ax.set_xticks(range(len(starts)), [labels[s] for s in starts])
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
