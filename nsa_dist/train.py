"""Training entry point: `python -m nsa_dist.train` or `nsa-train`, a Hydra app over nsa_dist.conf.

Launchers call `main(cfg)` with a composed config; it converts the config to dataclasses once
(`nsa_dist.config.run_config`) and hands each part only what it needs. Outputs land in the run
directory (Hydra's, unless `run_dir` is given): TensorBoard events under `tensorboard/`, one JSON line
per step in `train_log.jsonl`, checkpoints under `checkpoints/` (every `trainer.checkpoint_every`
steps; `trainer.resume=auto` continues from the latest) and the final weights in `final.pt`.
See docs/training.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nsa_dist import distributed, metrics
from nsa_dist.checkpoint import CheckpointDir, load_trainer_state
from nsa_dist.config import RunConfig, TrainConfig, run_config
from nsa_dist.data import Batch, build_source
from nsa_dist.distributed import SINGLE_PROCESS, DistributedContext
from nsa_dist.engine import DeepSpeedTrainEngine, TrainEngine
from nsa_dist.mesh import Mesh, build_mesh
from nsa_dist.model import NSATransformer
from nsa_dist.parallel import SequenceParallel, shard

log = logging.getLogger(__name__)

# Eval batches come from their own stream so they never repeat a training batch.
EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]  # one per step run, the mean over data-parallel replicas
    eval_metrics: dict[str, float]  # the last evaluation
    tokens_per_s: float  # per rank, averaged over the run
    run_dir: Path
    checkpoint: Path
    start_step: int = 0  # losses[i] is step start_step + i
    resumed_from: Path | None = None


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


def token_metrics(logits: torch.Tensor, batch: Batch,
                  sp: SequenceParallel | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate, and the replica's metrics: mean cross-entropy over all its targets, plus
    loss and accuracy on the answer bytes when there are some.

    With `sp`, `batch` holds this rank's shard of the replica's sequences. The local loss is the sum
    over local targets divided by the replica's target count, times the sp degree: summed over the
    replica's ranks that is its mean loss (times sp), so the mean of the gradients over all ranks (what
    the data-parallel all-reduce computes) is the sum over the sp ranks averaged over the replicas.
    Metrics are summed over the sp group (one small all-reduce).
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    per_token = per_token.view_as(batch.targets)  # (B, T_local)
    ranks = 1 if sp is None else sp.size
    tokens = batch.targets.numel() * ranks
    loss = per_token.mean() if sp is None else per_token.sum() * (ranks / tokens)
    detached = per_token.detach().double()
    sums = [detached.sum().reshape(1)]
    mask = batch.answer_mask
    if mask is not None:
        correct = (logits.argmax(-1) == batch.targets) & mask  # (B, T_local)
        sums += [(detached * mask).sum().reshape(1), correct.sum(-1).double(), mask.sum(-1).double()]
    sums = torch.cat(sums)  # (1 [+ 1 + B + B],)
    if sp is not None:
        dist.all_reduce(sums, group=sp.group)
    metrics = {"loss": (sums[0] / tokens).float()}
    if mask is not None:
        rows = batch.targets.shape[0]
        correct_rows, mask_rows = sums[2:2 + rows], sums[2 + rows:]
        metrics["answer_loss"] = (sums[1] / mask_rows.sum()).float()
        metrics["answer_accuracy"] = (correct_rows.sum() / mask_rows.sum()).float()
        metrics["passkey_exact"] = (correct_rows == mask_rows).float().mean()
    return loss, metrics


def shard_batch(batch: Batch, sp: SequenceParallel | None) -> Batch:
    """This rank's zigzag shard of a replica's batch; the targets were shifted on the full sequence."""
    if sp is None:
        return batch
    mask = None if batch.answer_mask is None else shard(batch.answer_mask, sp)
    return Batch(shard(batch.inputs, sp), shard(batch.targets, sp), mask)


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def build_engine(model: torch.nn.Module, run: RunConfig, dist_ctx: DistributedContext) -> TrainEngine:
    cfg = run.trainer
    optimizer = build_optimizer(model, cfg)
    if not run.zero.enabled:
        return TrainEngine(model, optimizer, grad_clip=cfg.grad_clip, dist_ctx=dist_ctx)
    return DeepSpeedTrainEngine(model, optimizer, zero=run.zero, micro_batch_size=cfg.batch_size,
                                grad_clip=cfg.grad_clip, bf16=cfg.precision == "bf16", dist_ctx=dist_ctx)


def checkpoint_to_resume(resume: str, checkpoints: CheckpointDir) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoints.latest()
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume!r} is not a checkpoint directory: pass one of "
                                f"{[str(p) for _, p in checkpoints.finished()] or 'none found'}, auto or never")
    return path


class _Checkpointing:
    """Saves and restores everything a step depends on: weights, optimizer, data positions, RNG streams."""

    def __init__(self, root: Path, keep: int, engine: TrainEngine, source, mesh: Mesh, dist_ctx: DistributedContext):
        self.dir = CheckpointDir(root, keep=keep)
        self.engine, self.source, self.mesh, self.rank = engine, source, mesh, dist_ctx.rank

    def save(self, step: int) -> Path:
        def write(directory: Path) -> None:
            self.engine.save(directory)
            # Each data-parallel replica is at its own place in its own stream.
            torch.save(self.source.state_dict(), directory / f"data_rank{self.rank}.pt")

        return self.dir.save(step, write, {"mesh": [self.mesh.dp, self.mesh.sp]})

    def restore(self, path: Path) -> int:
        """Load `path`; returns its step, the number of steps already taken."""
        trainer_state = torch.load(path / "trainer.pt", weights_only=False)
        if list(trainer_state.get("mesh", [])) != [self.mesh.dp, self.mesh.sp]:
            raise ValueError(f"{path} was written by a dp x sp = {trainer_state.get('mesh')} mesh, this job has "
                             f"{[self.mesh.dp, self.mesh.sp]}: resume with the same parallel.dp / parallel.sp")
        self.engine.load(path)
        self.source.load_state_dict(torch.load(path / f"data_rank{self.rank}.pt", weights_only=False))
        return int(load_trainer_state(path)["step"])


def train(run: RunConfig, *, run_dir: Path, hparams: dict | None = None,
          dist_ctx: DistributedContext = SINGLE_PROCESS) -> TrainResult:
    cfg = run.trainer
    device = resolve_device(cfg.device)
    mesh = build_mesh(run.parallel, dist_ctx)
    sp = mesh.sequence_parallel
    torch.manual_seed(cfg.seed)
    model = NSATransformer(run.model, run.nsa).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    num_parameters = model.num_parameters()
    distributed.broadcast_parameters(model, dist_ctx)
    engine = build_engine(model, run, dist_ctx)
    # Each data-parallel replica draws its own batches; the sp ranks of a replica draw the same batch and
    # keep their shards of it. Eval batches are the same everywhere.
    source = build_source(run.data, vocab_size=run.model.vocab_size,
                          generator=torch.Generator().manual_seed(cfg.seed + mesh.dp_rank))
    eval_source = build_source(run.data, vocab_size=run.model.vocab_size,
                               generator=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
    eval_batch = shard_batch(eval_source.sample(cfg.eval_batch_size), sp).to(device)
    # DeepSpeed's bf16 runs the whole module in bf16 with fp32 master weights; autocast is the torch path's.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16" and not run.zero.enabled)

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointing = _Checkpointing(Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else run_dir / "checkpoints",
                                   cfg.checkpoint_keep, engine, source, mesh, dist_ctx)
    resume_from = checkpoint_to_resume(cfg.resume, checkpointing.dir)
    if dist_ctx.is_distributed:
        # Rank 0 decides: on a shared file system another node may not see the newest checkpoint yet.
        choice = [resume_from]
        dist.broadcast_object_list(choice, src=0)
        resume_from = choice[0]
    start_step = checkpointing.restore(resume_from) if resume_from is not None else 0
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step or None) \
        if dist_ctx.is_main else distributed.Discard()
    log.info("model %.2fM parameters on %s; %s data, %d tokens per sequence; mesh dp=%d x sp=%d; %s; run dir %s",
             num_parameters / 1e6, device, run.data.kind, run.data.seq_len, mesh.dp, mesh.sp,
             f"DeepSpeed ZeRO-{run.zero.stage}" if run.zero.enabled else "plain torch", run_dir)
    if resume_from is not None:
        log.info("resumed from %s at step %d", resume_from, start_step)

    losses: list[float] = []
    eval_metrics: dict[str, float] = {}
    tokens_per_step = cfg.batch_size * run.data.seq_len * mesh.dp
    flops_per_step = metrics.model_flops_per_sequence(run.data.seq_len, run.model, run.nsa) * cfg.batch_size * mesh.dp
    peak_flops = metrics.peak_flops_per_device(device, cfg.peak_flops)
    timer = metrics.PhaseTimer(device)
    step_log = run_dir / "train_log.jsonl"
    started = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), desc="train", initial=start_step, total=cfg.steps,
               disable=not cfg.progress_bar or not dist_ctx.is_main, dynamic_ncols=True)
    with logging_redirect_tqdm(), contextlib.closing(writer):
        for step in bar:
            step_start = time.perf_counter()
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            with timer.phase("data"):
                batch = shard_batch(source.sample(cfg.batch_size), sp).to(device)
            model.train()
            with timer.phase("forward"):
                with autocast:
                    logits = engine.forward(batch.inputs, sp=sp)  # (B, T_local, vocab)
                loss, step_metrics = token_metrics(logits, batch, sp)
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                grad_norm = engine.step()

            # host sync: the loss is logged every step
            losses.append(distributed.mean_across_ranks(step_metrics["loss"], dist_ctx))
            step_s = time.perf_counter() - step_start
            tokens_per_s = tokens_per_step / step_s
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if dist_ctx.is_main:
                record = {"step": step, "loss": losses[-1], "lr": lr, "step_s": round(step_s, 4),
                          "tokens_per_s": round(tokens_per_s, 1),
                          "peak_memory_gib": round(metrics.peak_memory_bytes(device) / 2**30, 3)}
                if peak_flops:
                    record["mfu"] = round(flops_per_step / step_s / dist_ctx.world_size / peak_flops, 4)
                with step_log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            phases = timer.pop()
            exchanged = metrics.exchange_totals(sp.pop_stats()) if sp is not None else None
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                writer.add_scalar("train/loss", losses[-1], step)
                writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
                writer.add_scalar("train/tokens_per_s_per_device", tokens_per_s / dist_ctx.world_size, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/model_flops_per_s_per_device", flops_per_step / step_s / dist_ctx.world_size,
                                  step)
                if peak_flops:
                    writer.add_scalar("train/mfu", flops_per_step / step_s / dist_ctx.world_size / peak_flops, step)
                writer.add_scalar("memory/peak_bytes", metrics.peak_memory_bytes(device), step)
                for name, seconds in phases.items():
                    writer.add_scalar(f"time/{name}_s", seconds, step)
                if exchanged is not None:
                    for name, value in exchanged.items():
                        writer.add_scalar(f"comm/{name}", value, step)
                for name in ("answer_loss", "answer_accuracy"):
                    if name in step_metrics:
                        writer.add_scalar(f"train/{name}", float(step_metrics[name]), step)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == cfg.steps - 1:
                eval_metrics = evaluate(engine, eval_batch, autocast, sp)
                if sp is not None:
                    sp.pop_stats()  # the comm/* scalars count training steps only
                for name, value in eval_metrics.items():
                    writer.add_scalar(f"eval/{name}", value, step)
                log.info("step %d: %s", step + 1, ", ".join(f"eval/{k} {v:.3f}" for k, v in eval_metrics.items()))
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1):
                with timer.phase("checkpoint"):
                    path = checkpointing.save(step + 1)
                writer.add_scalar("time/checkpoint_s", timer.pop()["checkpoint"], step)
                log.info("step %d: checkpoint %s", step + 1, path)

        elapsed = time.perf_counter() - started
        steps_run = cfg.steps - start_step
        mean_tokens_per_s = tokens_per_step * steps_run / elapsed
        if hparams is not None and losses:
            writer.add_hparams(_flat_hparams(hparams), {"hparam/final_loss": losses[-1],
                                                        **{f"hparam/eval_{k}": v for k, v in eval_metrics.items()}},
                               run_name=".")

    checkpoint = run_dir / "final.pt"
    final_state = {"model": engine.full_state_dict(), "step": cfg.steps, "config": asdict(run)}
    if dist_ctx.is_main:
        if not run.zero.enabled:
            # The plain path's optimizer and data state are whole on rank 0; DeepSpeed's live in the checkpoints.
            final_state.update(optimizer=engine.optimizer.state_dict(), data=source.state_dict())
        save_atomically(final_state, checkpoint)
    engine.close()
    answer = eval_metrics.get("answer_accuracy")
    answer_note = "" if answer is None else f", eval answer accuracy {answer:.3f}"
    if losses:
        log.info("done: %d steps in %.0f s, loss %.3f (first) -> %.3f (last)%s, %.0f tokens/s; weights in %s",
                 steps_run, elapsed, losses[0], losses[-1], answer_note, mean_tokens_per_s, checkpoint)
    return TrainResult(losses=losses, eval_metrics=eval_metrics, tokens_per_s=mean_tokens_per_s, run_dir=run_dir,
                       checkpoint=checkpoint, start_step=start_step, resumed_from=resume_from)


@torch.no_grad()
def evaluate(engine: TrainEngine, batch: Batch, autocast, sp: SequenceParallel | None = None) -> dict[str, float]:
    engine.module.eval()
    with autocast:
        logits = engine.forward(batch.inputs, sp=sp)
    _, eval_metrics = token_metrics(logits, batch, sp)
    return {name: float(value) for name, value in eval_metrics.items()}


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
