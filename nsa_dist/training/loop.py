"""The training loop: `train(run, run_dir=...)` on one rank of a job, and the step, evaluation and NaN policy
it is made of.

`train` builds the mesh, the model (nsa_dist.nn.build_model, parallelized), the engine and the data
stream, hands each part only the section of the `RunConfig` it needs, and writes into the run
directory: TensorBoard events under `tensorboard/`, one JSON line per step in `train_log.jsonl`,
checkpoints under `checkpoints/` (every `trainer.checkpoint_every` steps; `trainer.resume=auto`
continues from the latest) and the final weights in `final.pt`. See docs/training.md.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nsa_dist.analysis.retrieval import run_retrieval_metrics
from nsa_dist.data.sharding import shard_batch
from nsa_dist.data.batch import Batch
from nsa_dist.data.sources import EVAL_SEED_OFFSET, build_source
from nsa_dist.nn.build import build_model
from nsa_dist.nn.parallelize import parallelize
from nsa_dist.parallel import ExchangeLog, Mesh, SequenceParallel, build_mesh
from nsa_dist.training import distributed, metrics
from nsa_dist.training.checkpoint import (TrainerCheckpoints, assert_finite, checkpoint_root, run_sections,
                                          save_final)
from nsa_dist.training.config import RunConfig, TrainConfig
from nsa_dist.training.distributed import SINGLE_PROCESS, DistributedContext
from nsa_dist.training.engine import DeepSpeedTrainEngine, TrainEngine
from nsa_dist.training.loss import token_metrics
from nsa_dist.training.run_log import RunLog

__all__ = ["TrainResult", "evaluate", "lr_at", "train", "train_step"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainResult:
    losses: list[float]  # one per step run, the mean over data-parallel replicas
    eval_metrics: dict[str, float]  # the last evaluation
    tokens_per_s: float  # the job's rate: tokens of all replicas per second, over the steps this run took
    tokens_per_s_per_device: float  # tokens_per_s / world size
    run_dir: Path
    checkpoint: Path
    start_step: int = 0  # losses[i] is step start_step + i
    resumed_from: Path | None = None
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient (trainer.nan_policy=skip)


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


def build_engine(model: torch.nn.Module, run: RunConfig, mesh: Mesh, dist_ctx: DistributedContext) -> TrainEngine:
    cfg = run.trainer
    optimizer = build_optimizer(model, cfg)
    if not run.zero.enabled:
        return TrainEngine(model, optimizer, grad_clip=cfg.grad_clip, mesh=mesh)
    return DeepSpeedTrainEngine(model, optimizer, zero=run.zero, micro_batch_size=cfg.batch_size,
                                grad_clip=cfg.grad_clip, bf16=cfg.precision == "bf16", mesh=mesh,
                                local_rank=dist_ctx.local_rank)


@dataclass(frozen=True)
class _Job:
    """What one rank trains with, built from the run config."""

    mesh: Mesh
    engine: TrainEngine
    source: Any  # the replica's batch stream (nsa_dist.data.build_source)
    eval_batch: Batch  # the replica's whole fixed eval batch, on the CPU; evaluate() shards it chunk by chunk
    autocast: Any
    exchange_log: ExchangeLog


def _build_job(run: RunConfig, device: torch.device, dist_ctx: DistributedContext, run_dir: Path) -> _Job:
    cfg = run.trainer
    mesh = build_mesh(run.parallel, device_type=device.type)
    exchange_log = ExchangeLog(timed=run.parallel.time_collectives)
    torch.manual_seed(cfg.seed)
    model = parallelize(build_model(run.model, run.nsa).to(device), mesh,
                        activation_checkpointing=cfg.activation_checkpointing, exchange_log=exchange_log)
    distributed.broadcast_parameters(model, dist_ctx)
    engine = build_engine(model, run, mesh, dist_ctx)
    # Each data-parallel replica draws its own batches; the sp ranks of a replica draw the same batch and
    # keep their shards of it. Eval batches are the same everywhere.
    source = build_source(run.data, vocab_size=run.model.vocab_size,
                          generator=torch.Generator().manual_seed(cfg.seed + mesh.dp_rank))
    # Text and files hold out a split: evaluation reads only bytes that training never sees.
    eval_source = build_source(run.data, vocab_size=run.model.vocab_size, split="eval",
                               generator=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
    eval_batch = eval_source.sample(cfg.eval_batch_size)
    # DeepSpeed's bf16 runs the whole module in bf16 with fp32 master weights; autocast is the torch path's.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16" and not run.zero.enabled)
    log.info("model %.2fM parameters on %s; %s data, %d tokens per sequence; mesh dp=%d x sp=%d; %s; run dir %s",
             model.num_parameters() / 1e6, device, run.data.kind, run.data.seq_len, mesh.dp_size, mesh.sp_size,
             f"DeepSpeed ZeRO-{run.zero.stage}" if run.zero.enabled else "plain torch", run_dir)
    return _Job(mesh, engine, source, eval_batch, autocast, exchange_log)


def _run_log(run: RunConfig, run_dir: Path, mesh: Mesh, device: torch.device, *, is_main: bool,
             start_step: int) -> RunLog:
    cfg = run.trainer
    sequences = cfg.batch_size * mesh.dp_size  # per step, all replicas
    return RunLog(run_dir, is_main=is_main, start_step=start_step, log_every=cfg.log_every, last_step=cfg.steps - 1,
                  device=device, world_size=mesh.world_size, tokens_per_step=sequences * run.data.seq_len,
                  flops_per_step=metrics.model_flops_per_sequence(run.data.seq_len, run.model, run.nsa) * sequences,
                  peak_flops=metrics.peak_flops_per_device(device, cfg.peak_flops))


def train(run: RunConfig, *, run_dir: Path, hparams: dict | None = None,
          dist_ctx: DistributedContext = SINGLE_PROCESS) -> TrainResult:
    """Train on this rank of the job `dist_ctx` describes; every rank calls it, rank 0 writes the outputs."""
    cfg = run.trainer
    device = resolve_device(cfg.device)
    job = _build_job(run, device, dist_ctx, run_dir)
    engine, mesh, sp = job.engine, job.mesh, job.mesh.sequence_parallel
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = TrainerCheckpoints(checkpoint_root(cfg, run_dir), cfg.checkpoint_keep, engine=engine,
                                     source=job.source, mesh=mesh, accept=cfg.resume_accept,
                                     config=run_sections(run))
    start_step, resumed_from = checkpoints.resume(cfg.resume)
    if resumed_from is not None:
        log.info("resumed from %s at step %d", resumed_from, start_step)
    run_log = _run_log(run, run_dir, mesh, device, is_main=dist_ctx.is_main, start_step=start_step)
    if hparams is not None:
        run_log.start_hparams(hparams)

    losses: list[float] = []
    eval_metrics: dict[str, float] = {}
    nonfinite = NonFiniteSteps(cfg)
    timer = metrics.PhaseTimer(device)
    started = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), desc="train", initial=start_step, total=cfg.steps,
               disable=not cfg.progress_bar or not dist_ctx.is_main, dynamic_ncols=True)
    with logging_redirect_tqdm(), contextlib.closing(run_log):
        for step in bar:
            step_start = time.perf_counter()
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            loss, step_metrics, grad_norm = train_step(engine, job.source.sample(cfg.batch_size), sp, device,
                                                       job.autocast, timer, dp_group=mesh.dp_group,
                                                       loss_on=run.data.loss_on)
            losses.append(loss)
            exchanged = metrics.exchange_totals(job.exchange_log.pop()) if sp is not None else None
            tokens_per_s = run_log.step(step, loss=losses[-1], lr=lr,
                                        grad_norm=float("nan") if grad_norm is None else grad_norm,
                                        step_s=time.perf_counter() - step_start, phases=timer.pop(),
                                        exchanged=exchanged, step_metrics=step_metrics)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if nonfinite.seen(step, loss, grad_norm, lr):
                run_log.scalars("train", {"skipped_steps": nonfinite.skipped}, step)
                continue
            if step < cfg.steps - 1 and _due(step, cfg.eval_every, cfg.steps):
                eval_metrics = _evaluate_and_log(run, job, run_log, device, step)
            if cfg.checkpoint_every and _due(step, cfg.checkpoint_every, cfg.steps):
                with timer.phase("checkpoint"):
                    path = checkpoints.save(step + 1)
                run_log.scalars("time", {"checkpoint_s": timer.pop()["checkpoint"]}, step)
                log.info("step %d: checkpoint %s", step + 1, path)
        elapsed = time.perf_counter() - started
        # The weights are on disk before the closing evaluation, so nothing it does can lose them.
        checkpoint = _save_final(run_dir / "final.pt", engine, job.source, run, is_main=dist_ctx.is_main)
        if start_step < cfg.steps:
            eval_metrics = _evaluate_and_log(run, job, run_log, device, cfg.steps - 1)
        if losses:
            run_log.end_hparams({"final_loss": losses[-1], **{f"eval_{k}": v for k, v in eval_metrics.items()}},
                                cfg.steps - 1)
    engine.close()
    steps_run = cfg.steps - start_step
    job_tokens_per_s = run_log.tokens_per_step * steps_run / elapsed
    if losses:
        answer = eval_metrics.get("answer_accuracy")
        answer_note = "" if answer is None else f", eval answer accuracy {answer:.3f}"
        log.info("done: %d steps in %.0f s, loss %.3f (first) -> %.3f (last)%s, %.0f tokens/s; weights in %s",
                 steps_run, elapsed, losses[0], losses[-1], answer_note, job_tokens_per_s, checkpoint)
    return TrainResult(losses=losses, eval_metrics=eval_metrics, tokens_per_s=job_tokens_per_s,
                       tokens_per_s_per_device=job_tokens_per_s / mesh.world_size, run_dir=run_dir,
                       checkpoint=checkpoint, start_step=start_step, resumed_from=resumed_from,
                       skipped_steps=nonfinite.skipped)


def _evaluate_and_log(run: RunConfig, job: _Job, run_log: RunLog, device: torch.device, step: int) -> dict[str, float]:
    """The eval metrics after `step`, in training-sized chunks (evaluation fits wherever training fits)."""
    sp = job.mesh.sequence_parallel
    eval_metrics = evaluate(job.engine, job.eval_batch, job.autocast, sp, micro_batch_size=run.trainer.batch_size,
                            device=device)
    eval_metrics.update(run_retrieval_metrics(run, job.engine.module, device=device, sp=sp))
    job.exchange_log.pop()  # the comm/* scalars count training steps only
    run_log.scalars("eval", eval_metrics, step)
    log.info("step %d: %s", step + 1, ", ".join(f"eval/{k} {v:.3f}" for k, v in eval_metrics.items()))
    return eval_metrics


def train_step(engine: TrainEngine, batch: Batch, sp: SequenceParallel | None, device: torch.device, autocast,
               timer: metrics.PhaseTimer, *, dp_group: Any = None,
               loss_on: str = "all") -> tuple[float, dict[str, torch.Tensor], float | None]:
    """One optimizer step on a replica's batch (this rank keeps its shard): the loss (mean over the
    replicas in `dp_group`), the step's metrics and the gradient norm (None: the engine does not say).
    A non-finite loss or norm is the same on every rank and leaves the weights as they were (plain path)."""
    with timer.phase("data"):
        batch = shard_batch(batch, sp).to(device)
    engine.module.train()
    with timer.phase("forward"):
        with autocast:
            logits = engine.forward(batch.inputs)  # (B, T_local, vocab)
        loss, step_metrics = token_metrics(logits, batch, sp, loss_on=loss_on)
    with timer.phase("backward"):
        engine.backward(loss)
    # host sync: the loss is logged every step, and decides whether the update is applied. The replica's
    # loss is the same on its sp ranks (token_metrics), and this all-reduce makes it the same on every
    # rank, so every rank takes the same decision without a collective of its own.
    replica_loss = distributed.mean_across_ranks(step_metrics["loss"], dp_group)
    with timer.phase("optimizer"):
        grad_norm = engine.step(loss_is_finite=math.isfinite(replica_loss))
    return replica_loss, step_metrics, grad_norm


# Weights of each metric when chunks are combined: the token loss and answer_exact average over rows
# (every row has seq_len targets), the answer metrics over answer targets.
_ANSWER_METRICS = ("answer_loss", "answer_accuracy")


@torch.no_grad()
def evaluate(engine: TrainEngine, batch: Batch, autocast, sp: SequenceParallel | None = None, *,
             micro_batch_size: int | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Metrics over the replica's whole `batch`, run `micro_batch_size` rows at a time (so evaluation fits
    wherever a training step fits); each chunk is sharded for this rank and moved to `device`."""
    engine.module.eval()
    rows = batch.inputs.shape[0]
    step = micro_batch_size or rows
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for start in range(0, rows, step):
        chunk = Batch(batch.inputs[start:start + step], batch.targets[start:start + step],
                      None if batch.answer_mask is None else batch.answer_mask[start:start + step])
        local = shard_batch(chunk, sp).to(device)
        with autocast:
            logits = engine.forward(local.inputs)  # (b, T_local, vocab)
        _, chunk_metrics = token_metrics(logits, local, sp)
        answers = float(chunk.answer_mask.sum()) if chunk.answer_mask is not None else 0.0
        for name, value in chunk_metrics.items():
            weight = answers if name in _ANSWER_METRICS else float(chunk.inputs.shape[0])
            totals[name] = totals.get(name, 0.0) + float(value) * weight
            weights[name] = weights.get(name, 0.0) + weight
    return {name: totals[name] / weights[name] if weights[name] else float("nan") for name in totals}


class NonFiniteLoss(RuntimeError):
    """The run stopped: the loss or the gradient norm was NaN or infinite."""


class NonFiniteSteps:
    """What `trainer.nan_policy` does with a step whose loss or gradient norm is not finite."""

    def __init__(self, cfg: TrainConfig):
        self.policy, self.limit, self.lr = cfg.nan_policy, cfg.nan_skip_limit, cfg.lr
        self.skipped = 0  # in all
        self.in_a_row = 0

    def seen(self, step: int, loss: float, grad_norm: float | None, lr: float) -> bool:
        """Whether the step's update was dropped; raises NonFiniteLoss when the run must stop."""
        bad = [] if math.isfinite(loss) else [f"loss {loss}"]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"gradient norm {grad_norm}")
        if not bad:
            self.in_a_row = 0
            return False
        what = " and ".join(bad)
        fix = f"lower trainer.lr (now {self.lr:g}, {lr:g} at this step) or check the data"
        if self.policy == "stop":
            raise NonFiniteLoss(f"step {step + 1}: non-finite {what}, run stopped (trainer.nan_policy=stop) "
                                f"and nothing of this step saved: {fix}")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"step {step + 1}: non-finite {what} in {self.in_a_row} steps in a row "
                                f"(trainer.nan_skip_limit={self.limit}), run stopped: {fix}")
        log.warning("step %d: non-finite %s, update skipped (%d in a row, %d in all; trainer.nan_skip_limit=%d)",
                    step + 1, what, self.in_a_row, self.skipped, self.limit)
        return True


def _due(step: int, every: int, steps: int) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps (0: never) and after the last."""
    return (every and (step + 1) % every == 0) or step == steps - 1


def _save_final(path: Path, engine: TrainEngine, source, run: RunConfig, *, is_main: bool) -> Path:
    model_state = engine.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    assert_finite(model_state.items(), str(path))  # on every rank, so that all of them stop together
    if is_main:
        # The plain path's optimizer and data state are whole on rank 0; DeepSpeed's live in the checkpoints.
        extra = None if run.zero.enabled else {"optimizer": engine.optimizer.state_dict(), "data": source.state_dict()}
        save_final(path, model_state, step=run.trainer.steps, config=asdict(run), extra=extra)
    return path
