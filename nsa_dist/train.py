"""Training entry point: `python -m nsa_dist.train` or `nsa-train`, a Hydra app over nsa_dist.conf.

Launchers call `main(cfg)` with a composed config; it converts the config to dataclasses once
(`nsa_dist.config.run_config`) and hands each part only what it needs. Outputs land in the run
directory (Hydra's, unless `run_dir` is given): TensorBoard events under `tensorboard/` and the
final weights in `final.pt`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nsa_dist import distributed
from nsa_dist.config import RunConfig, TrainConfig, run_config
from nsa_dist.data import Batch, build_source
from nsa_dist.distributed import SINGLE_PROCESS, DistributedContext
from nsa_dist.model import NSATransformer

log = logging.getLogger(__name__)

# Eval batches come from their own stream so they never repeat a training batch.
EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]  # one per step, the mean over ranks
    eval_metrics: dict[str, float]  # the last evaluation
    tokens_per_s: float  # per rank, averaged over the run
    run_dir: Path
    checkpoint: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible: use trainer=cpu or trainer.device=auto")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices, so norms, biases and φ's position tables are not pulled to 0."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in params if p.dim() >= 2 and not name.endswith(".pos")]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for _, p in params if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def token_metrics(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over all targets, plus loss and accuracy on the answer bytes when there are some."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    per_token = per_token.view_as(batch.targets)  # (B, T)
    loss = per_token.mean()
    metrics = {"loss": loss.detach()}
    if batch.answer_mask is not None:
        mask = batch.answer_mask
        correct = (logits.argmax(-1) == batch.targets) & mask  # (B, T)
        metrics["answer_loss"] = per_token.detach()[mask].mean()
        metrics["answer_accuracy"] = correct.sum() / mask.sum()
        metrics["passkey_exact"] = (correct.sum(-1) == mask.sum(-1)).float().mean()
    return loss, metrics


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(run: RunConfig, *, run_dir: Path, hparams: dict | None = None,
          dist_ctx: DistributedContext = SINGLE_PROCESS) -> TrainResult:
    cfg = run.trainer
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = NSATransformer(run.model, run.nsa).to(device)
    distributed.broadcast_parameters(model, dist_ctx)
    optimizer = build_optimizer(model, cfg)
    # Data parallelism: each rank draws its own training batches; eval batches are the same everywhere.
    source = build_source(run.data, vocab_size=run.model.vocab_size,
                          generator=torch.Generator().manual_seed(cfg.seed + dist_ctx.rank))
    eval_source = build_source(run.data, vocab_size=run.model.vocab_size,
                               generator=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
    eval_batch = eval_source.sample(cfg.eval_batch_size).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard")) if dist_ctx.is_main else distributed.Discard()
    log.info("model %.2fM parameters on %s; %s data, %d tokens per sequence; run dir %s",
             model.num_parameters() / 1e6, device, run.data.kind, run.data.seq_len, run_dir)

    losses: list[float] = []
    eval_metrics: dict[str, float] = {}
    tokens_per_step = cfg.batch_size * run.data.seq_len
    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", disable=not cfg.progress_bar or not dist_ctx.is_main,
               dynamic_ncols=True)
    with logging_redirect_tqdm(), contextlib.closing(writer):
        for step in bar:
            step_start = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = source.sample(cfg.batch_size).to(device)
            model.train()
            with autocast:
                logits = model(batch.inputs)  # (B, T, vocab)
            loss, metrics = token_metrics(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(model, dist_ctx)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()

            # host sync: the loss is logged every step
            losses.append(distributed.mean_across_ranks(loss.detach(), dist_ctx))
            tokens_per_s = tokens_per_step / (time.perf_counter() - step_start)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                writer.add_scalar("train/loss", losses[-1], step)
                writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                for name in ("answer_loss", "answer_accuracy"):
                    if name in metrics:
                        writer.add_scalar(f"train/{name}", float(metrics[name]), step)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == cfg.steps - 1:
                eval_metrics = evaluate(model, eval_batch, autocast)
                for name, value in eval_metrics.items():
                    writer.add_scalar(f"eval/{name}", value, step)
                log.info("step %d: %s", step + 1, ", ".join(f"eval/{k} {v:.3f}" for k, v in eval_metrics.items()))

        elapsed = time.perf_counter() - started
        mean_tokens_per_s = tokens_per_step * cfg.steps / elapsed
        if hparams is not None:
            writer.add_hparams(_flat_hparams(hparams), {"hparam/final_loss": losses[-1],
                                                        **{f"hparam/eval_{k}": v for k, v in eval_metrics.items()}},
                               run_name=".")

    checkpoint = run_dir / "final.pt"
    if dist_ctx.is_main:
        save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": cfg.steps,
                         "data": source.state_dict(), "config": asdict(run)},
                        checkpoint)
    answer = eval_metrics.get("answer_accuracy")
    answer_note = "" if answer is None else f", eval answer accuracy {answer:.3f}"
    log.info("done: %d steps in %.0f s, loss %.3f (first) -> %.3f (last)%s, %.0f tokens/s; weights in %s",
             cfg.steps, elapsed, losses[0], losses[-1], answer_note, mean_tokens_per_s, checkpoint)
    return TrainResult(losses=losses, eval_metrics=eval_metrics, tokens_per_s=mean_tokens_per_s, run_dir=run_dir,
                       checkpoint=checkpoint)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: Batch, autocast) -> dict[str, float]:
    model.eval()
    with autocast:
        logits = model(batch.inputs)
    _, metrics = token_metrics(logits, batch)
    return {name: float(value) for name, value in metrics.items()}


def _flat_hparams(tree: dict, prefix: str = "") -> dict:
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


def _default_run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def main(cfg: DictConfig, *, run_dir: str | Path | None = None) -> TrainResult:
    """Train from a composed config (what `nsa_dist.conf/config.yaml` composes to, with overrides)."""
    run = run_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir()
    # launcher=torchrun|ray: this process starts the ranks, each calls main again, rank 0's result comes back.
    started = distributed.start_ranks(cfg, main, run_dir=run_dir)
    if started is not None:
        return started
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams.pop("hydra", None)
    dist_ctx = distributed.init_process_group(cfg, run_dir=run_dir)
    try:
        return train(run, run_dir=run_dir, hparams=hparams, dist_ctx=dist_ctx)
    finally:
        distributed.destroy_process_group(dist_ctx)


@hydra.main(config_path="pkg://nsa_dist.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    main(cfg)


def cli() -> None:
    """The `nsa-train` console script: Hydra parses the command line."""
    _hydra_main()


if __name__ == "__main__":
    cli()
