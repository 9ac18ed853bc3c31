"""What one run reads, as frozen dataclasses: `TrainConfig` (the `trainer` section) and `RunConfig`, every
section together with the checks that span sections. Built and validated once, by nsa_dist.config.run_config
from a composed Hydra config, or directly in Python."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from nsa_dist.data.sources import DataConfig, check_vocab_size
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig
from nsa_dist.parallel import ParallelConfig, check_length
from nsa_dist.training.checkpoint import ACCEPTABLE_CHANGES, CONFIG_SECTIONS, acceptable_change
from nsa_dist.training.engine import ZeroConfig

OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: str = "fp32"
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    log_every: int = 1
    eval_every: int = 25  # 0: evaluate only at the end
    eval_batch_size: int = 16
    progress_bar: bool = True
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward
    checkpoint_every: int = 0  # steps between checkpoints; 0: none during the run
    checkpoint_keep: int = 2  # finished checkpoints kept on disk
    checkpoint_dir: str | None = None  # None: <run dir>/checkpoints
    resume: str = "auto"  # auto: the latest finished checkpoint, if any | never | <checkpoint path>
    # A new run where another run's files are: rename them aside (<dir>.moved-<time>) first, never delete.
    move_old_run: bool = False
    # Config keys a resume may change on purpose, e.g. [data.seq_len]; only keys that keep parameter shapes.
    resume_accept: list[str] = field(default_factory=list)
    # A non-finite loss or gradient norm: stop the run (naming the step), or skip that step's update and
    # stop after nan_skip_limit skipped steps in a row.
    nan_policy: str = "stop"
    nan_skip_limit: int = 3
    peak_flops: float | None = None  # per device, for model FLOPs utilisation; None: known GPUs only

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"trainer.{f.name}={value} is not a finite number, and a step computed with it "
                                 f"is NaN: give a finite value (the default is {f.default})")
        positive = ("steps", "batch_size", "lr", "log_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "checkpoint_every")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.checkpoint_keep < 1:
            raise ValueError(f"trainer.checkpoint_keep must be at least 1, got {self.checkpoint_keep}")
        if not self.resume:
            raise ValueError("trainer.resume must be auto, never or a checkpoint path")
        if self.nan_skip_limit < 1:
            raise ValueError(f"trainer.nan_skip_limit must be at least 1, got {self.nan_skip_limit}")
        for key in self.resume_accept:
            if key.split(".")[0] not in CONFIG_SECTIONS or not acceptable_change(key):
                raise ValueError(f"trainer.resume_accept: {key} cannot be accepted on resume (it changes parameter "
                                 f"shapes, the mesh, or is no config key); acceptable: {', '.join(ACCEPTABLE_CHANGES)}")
        if self.precision == "fp16":
            raise ValueError("trainer.precision=fp16 is not supported: fp16 needs a loss scaler, which the trainer does "
                             "not have; use trainer.precision=bf16 (the same speed on GPUs that have bf16) or fp32")
        for name, allowed in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("device", DEVICES),
                              ("nan_policy", NAN_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown trainer.{name}={getattr(self, name)!r}: choose one of {allowed}")
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything one run reads; `launcher` only decides how its ranks start."""

    model: ModelConfig = field(default_factory=ModelConfig)
    nsa: NSAConfig = field(default_factory=NSAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "RunConfig":
        """What no single section can check (each section is valid once built); raises ValueError naming the
        keys and the fix, returns self."""
        seq_len, select_size = self.data.seq_len, self.nsa.select_size
        if seq_len % select_size:
            fit = max(select_size, seq_len // select_size * select_size)
            raise ValueError(f"data.seq_len={seq_len} is not a multiple of nsa.select_size={select_size}: "
                             f"use e.g. data.seq_len={fit}")
        if self.parallel.sp_size > 1:
            try:
                check_length(seq_len, self.parallel.sp_size, multiple=select_size, what=f"data.seq_len={seq_len}")
            except ValueError as e:
                raise ValueError(f"parallel.sp_size={self.parallel.sp_size}: {e}") from e
        if self.trainer.nan_policy == "skip" and self.zero.enabled:
            raise ValueError("trainer.nan_policy=skip works on the plain torch path only: DeepSpeed has applied "
                             "the update by the time it knows the gradient norm; use trainer.nan_policy=stop "
                             "with zero=stage1|2|3, or zero=none")
        if self.model.attention == "window" and not self.nsa.window:
            raise ValueError("model.attention=window attends over the last nsa.window keys, and nsa.window=0: "
                             "set nsa.window (e.g. nsa.window=512)")
        check_vocab_size(self.data.kind, self.model.vocab_size)
