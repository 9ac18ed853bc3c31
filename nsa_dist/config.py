"""The run config: one dataclass per config group, registered with Hydra as schemas, converted once.

Each group of nsa_dist.conf names its schema first in its defaults list (`defaults: [model_schema,
_self_]`) and states only what differs from the dataclass's defaults; `config.yaml` starts from
`run_schema`, the whole `RunConfig`. Hydra therefore rejects an unknown key or a value of the wrong
type while composing, and `run_config(cfg)` — the only place that reads a `DictConfig` — turns the
composed config into a validated `RunConfig` with `OmegaConf.to_object`. Everything below it takes
the dataclass of its own section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from nsa_dist.checkpoint import ACCEPTABLE_CHANGES, CONFIG_SECTIONS, acceptable_change
from nsa_dist.data import DataConfig
from nsa_dist.engine import ZeroConfig
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.layer import NSAConfig
from nsa_dist.model import ModelConfig
from nsa_dist.parallel import ParallelConfig, check_length

# `${mul:a,b}` in a config: a weak-scaling sweep keeps the tokens per GPU fixed, so its sequence length is
# `${mul:${parallel.sp},TOKENS_PER_GPU}` (conf/experiment/scaling_weak.yaml). Registered with the schemas,
# which every reader of a run config (the trainer, the report, bench/project.py) imports.
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(int(f) for f in factors))

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
    # Config keys a resume may change on purpose, e.g. [data.seq_len]; only keys that keep parameter shapes.
    resume_accept: list[str] = field(default_factory=list)
    # A non-finite loss or gradient norm: stop the run (naming the step), or skip that step's update and
    # stop after nan_skip_limit skipped steps in a row.
    nan_policy: str = "stop"
    nan_skip_limit: int = 3
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
        if self.nan_skip_limit < 1:
            raise ValueError(f"trainer.nan_skip_limit must be at least 1, got {self.nan_skip_limit}")
        for key in self.resume_accept:
            if key.split(".")[0] not in CONFIG_SECTIONS or not acceptable_change(key):
                raise ValueError(f"trainer.resume_accept: {key} cannot be accepted on resume (it changes parameter "
                                 f"shapes, the mesh, or is no config key); acceptable: {', '.join(ACCEPTABLE_CHANGES)}")
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

    def validate(self) -> "RunConfig":
        """Raises ValueError naming the bad key and the fix; returns self."""
        try:
            self.model.validate()
        except ValueError as e:
            raise ValueError(f"{e}: fix the model.* override or pick a preset (model=tiny|small|base)") from e
        try:
            self.nsa.validate()
        except ValueError as e:
            raise ValueError(f"{e}: fix the nsa.* override or pick a preset (nsa=paper|fla|tiny)") from e
        for section in (self.data, self.trainer, self.parallel, self.zero, self.launcher):
            section.validate()
        self._check_consistent()
        return self

    def _check_consistent(self) -> None:
        seq_len, select_size = self.data.seq_len, self.nsa.select_size
        if seq_len % select_size:
            fit = max(select_size, seq_len // select_size * select_size)
            raise ValueError(f"data.seq_len={seq_len} is not a multiple of nsa.select_size={select_size}: "
                             f"use e.g. data.seq_len={fit}")
        if self.parallel.sp > 1:
            try:
                check_length(seq_len, self.parallel.sp, multiple=select_size, what=f"data.seq_len={seq_len}")
            except ValueError as e:
                raise ValueError(f"parallel.sp={self.parallel.sp}: {e}") from e
        if self.trainer.nan_policy == "skip" and self.zero.enabled:
            raise ValueError("trainer.nan_policy=skip works on the plain torch path only: DeepSpeed has applied "
                             "the update by the time it knows the gradient norm; use trainer.nan_policy=stop "
                             "with zero=stage1|2|3, or zero=none")
        if self.data.kind in ("passkey", "text") and self.model.vocab_size < 256:
            raise ValueError(f"data={self.data.kind} is byte-level: model.vocab_size must be at least 256, "
                             f"got {self.model.vocab_size}")


SECTIONS = {f.name: f.default_factory for f in fields(RunConfig)}


def schema(cls) -> DictConfig:
    """`cls` as a Hydra schema node. A frozen dataclass makes a read-only node, which config files
    could not override; the dataclass built from the composed config is frozen again."""
    node = OmegaConf.structured(cls)
    _make_writable(node)
    return node


def _make_writable(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, None)
    for child in node.values():
        if isinstance(child, DictConfig):
            _make_writable(child)


def register_schemas() -> None:
    """`run_schema` for config.yaml and `<group>_schema` in each group, for the files' defaults lists."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=schema(RunConfig))
    for group, cls in SECTIONS.items():
        store.store(group=group, name=f"{group}_schema", node=schema(cls))


def run_config(cfg: DictConfig) -> RunConfig:
    """The validated `RunConfig` of a composed config (its `hydra` node, if any, is left out).

    Raises ValueError naming the bad key and the fix.
    """
    try:
        # Plain values, so that the schema judges every key: a composed node would bring along keys that
        # `+group.key=value` appended to it.
        sections = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in SECTIONS if k in cfg]))
        typed = OmegaConf.merge(schema(RunConfig), sections)
        run = OmegaConf.to_object(typed)
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key} has no value: set it on the command line ({e.full_key}=...)") from e
    except (ConfigAttributeError, ConfigKeyError) as e:
        section = str(e.full_key).split(".")[0]
        known = ", ".join(f.name for f in fields(SECTIONS[section])) if section in SECTIONS else ", ".join(SECTIONS)
        raise ValueError(f"unknown setting {e.full_key}: {section} takes {known}") from e
    except OmegaConfBaseException as e:
        reason = str(e.msg).splitlines()[0]
        raise ValueError(f"{e.full_key}: {reason}: fix the {e.full_key} override") from e
    return run.validate()
