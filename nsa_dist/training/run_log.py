"""What rank 0 records of a run: TensorBoard scalars, one JSON line per step, its hparams.

Every rank makes a `RunLog` and calls it the same way; on the other ranks the TensorBoard writer is a
`Discard` and nothing is written, so the training loop needs no rank checks around its logging.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from nsa_dist.training import metrics


# The metrics TensorBoard's HParams tab shows beside each run's config.
HPARAM_METRICS = ("hparam/final_loss", "train/loss", "train/tokens_per_s_per_device", "eval/answer_accuracy")


class Discard:
    """Stands in for a rank-0-only object (the TensorBoard writer) on the other ranks: every call is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class RunLog:
    """Per-step records of one run under `run_dir`: `tensorboard/` and `train_log.jsonl`.

    `tokens_per_step` counts the tokens of all replicas; `flops_per_step` the model FLOPs of all of
    them, so dividing by `world_size` gives the per-device rates.
    """

    def __init__(self, run_dir: Path, *, is_main: bool, start_step: int, log_every: int, last_step: int,
                 device: torch.device, world_size: int, tokens_per_step: int, flops_per_step: int,
                 peak_flops: float | None):
        self.is_main = is_main
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step or None) \
            if is_main else Discard()
        self.step_log = run_dir / "train_log.jsonl"
        if is_main:
            _drop_steps_from(self.step_log, start_step)
        self.log_every, self.last_step = log_every, last_step
        self.device, self.world_size = device, world_size
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, step_s: float,
             phases: dict[str, float], exchanged: dict[str, int] | None,
             step_metrics: dict[str, torch.Tensor]) -> float:
        """Record one training step; returns its tokens per second (all replicas)."""
        tokens_per_s = self.tokens_per_step / step_s
        flops_per_s_per_device = self.flops_per_step / step_s / self.world_size
        mfu = flops_per_s_per_device / self.peak_flops if self.peak_flops else None
        peak_memory = metrics.peak_memory_bytes(self.device)
        if self.is_main:
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_s": round(step_s, 4),
                      "tokens_per_s": round(tokens_per_s, 1), "peak_memory_gib": round(peak_memory / 2**30, 3)}
            if mfu is not None:
                record["mfu"] = round(mfu, 4)
            with self.step_log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % self.log_every and step != self.last_step:
            return tokens_per_s
        scalars = {"train/loss": loss, "train/tokens_per_s": tokens_per_s,
                   "train/tokens_per_s_per_device": tokens_per_s / self.world_size, "train/lr": lr,
                   "train/grad_norm": grad_norm, "train/model_flops_per_s_per_device": flops_per_s_per_device,
                   "memory/peak_bytes": peak_memory}
        if mfu is not None:
            scalars["train/mfu"] = mfu
        scalars.update({f"time/{name}_s": seconds for name, seconds in phases.items()})
        scalars.update({f"comm/{name}": value for name, value in (exchanged or {}).items()})
        scalars.update({f"train/{name}": float(step_metrics[name])
                        for name in ("answer_loss", "answer_accuracy") if name in step_metrics})
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        return tokens_per_s

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def start_hparams(self, hparams: dict) -> None:
        """The run's config as TensorBoard hparams, written when it starts: a run that stops midway, or
        resumes, still shows up beside the others of its sweep."""
        if not self.is_main:
            return
        experiment, session_start, _ = hparams_summaries(_flat_hparams(hparams), dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (experiment, session_start):
            self.writer._get_file_writer().add_summary(summary)

    def end_hparams(self, results: dict[str, float], step: int) -> None:
        """The run's closing numbers under `hparam/`, the metrics the HParams tab reads."""
        for name, value in results.items():
            self.writer.add_scalar(f"hparam/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


def _drop_steps_from(step_log: Path, start_step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: their records from before the resume go,
    so that each step is in the log once (rewritten beside the log, then renamed)."""
    if not step_log.is_file():
        return
    lines = step_log.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", -1) < start_step]
    if len(kept) == len(lines):
        return
    tmp = step_log.with_name(step_log.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, step_log)


def _flat_hparams(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
