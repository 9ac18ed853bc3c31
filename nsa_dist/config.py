"""The composed Hydra config turned into plain frozen dataclasses, once, with errors that say the fix.

`run_config(cfg)` is the only place that reads a `DictConfig`; everything below it takes the
dataclass of its own section (`ModelConfig`, `NSAConfig`, `DataConfig`, `TrainConfig`,
`ParallelConfig`, `ZeroConfig`). `parallel` and `zero` may be absent: one replica, plain torch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from nsa_dist.data import DataConfig
from nsa_dist.engine import ZeroConfig
from nsa_dist.layer import NSAConfig
from nsa_dist.mesh import ParallelConfig
from nsa_dist.model import ModelConfig
from nsa_dist.parallel import check_length

OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


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
    peak_flops: float | None = None  # per device, for model FLOPs utilisation; None: known GPUs only

    def validate(self) -> "TrainConfig":
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
        for name, allowed in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown trainer.{name}={getattr(self, name)!r}: choose one of {allowed}")
        return self


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    nsa: NSAConfig
    data: DataConfig
    trainer: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    zero: ZeroConfig = ZeroConfig()


def run_config(cfg: DictConfig) -> RunConfig:
    """Convert and validate the composed config; raises ValueError naming the bad key and the fix."""
    sections = {"model": ModelConfig, "nsa": NSAConfig, "data": DataConfig, "trainer": TrainConfig}
    missing = [name for name in sections if name not in cfg]
    if missing:
        raise ValueError(f"config has no {', '.join(missing)} section: compose it from nsa_dist.conf/config.yaml")
    optional = {"parallel": ParallelConfig, "zero": ZeroConfig}
    sections.update({name: cls for name, cls in optional.items() if cfg.get(name) is not None})
    built = {name: _dataclass_from(cls, cfg[name], name) for name, cls in sections.items()}
    try:
        built["model"].validate()
    except ValueError as e:
        raise ValueError(f"{e}: fix the model.* override or pick a preset (model=tiny|small|base)") from e
    try:
        built["nsa"].validate()
    except ValueError as e:
        raise ValueError(f"{e}: fix the nsa.* override or pick a preset (nsa=paper|fla|tiny)") from e
    built["data"].validate()
    built["trainer"].validate()
    for name in optional:
        if name in built:
            built[name].validate()
    run = RunConfig(**built)
    _check_consistent(run)
    return run


def _check_consistent(run: RunConfig) -> None:
    seq_len, select_size = run.data.seq_len, run.nsa.select_size
    if seq_len % select_size:
        fit = max(select_size, seq_len // select_size * select_size)
        raise ValueError(f"data.seq_len={seq_len} is not a multiple of nsa.select_size={select_size}: "
                         f"use e.g. data.seq_len={fit}")
    if run.parallel.sp > 1:
        try:
            check_length(seq_len, run.parallel.sp, multiple=select_size, what=f"data.seq_len={seq_len}")
        except ValueError as e:
            raise ValueError(f"parallel.sp={run.parallel.sp}: {e}") from e
    if run.data.kind in ("passkey", "text") and run.model.vocab_size < 256:
        raise ValueError(f"data={run.data.kind} is byte-level: model.vocab_size must be at least 256, "
                         f"got {run.model.vocab_size}")


def _dataclass_from(cls, node, section: str):
    if not isinstance(node, DictConfig):
        raise ValueError(f"config section {section!r} must be a mapping, got {node!r}")
    try:
        values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ValueError(f"{section}.{e.key} has no value: set it on the command line ({section}.{e.key}=...)") from e
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting {section}.{unknown[0]}: {section} takes {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()})


def _coerce(value, hint, key: str):
    """Check `value` against the field's annotation; ints pass where floats are expected."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{key} needs a value, got null")
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ValueError(f"{key} must be {names}, got {value!r}")
