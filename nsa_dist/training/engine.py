"""One optimizer step, two ways: plain torch (gradient all-reduce, clip, AdamW) or DeepSpeed's ZeRO engine.

The training loop sees only `TrainEngine`: `backward(loss)`, `step() -> grad norm` (the plain path
skips a non-finite update), `save(dir)`,
`load(dir)`, `lr`. Both take the job's `Mesh` and expect the loss of each rank to be scaled so that
the mean of the gradients over the mesh's `grad_group` (every dp x sp rank) is the training gradient
(nsa_dist.training.loss.causal_lm_loss, the one place that scaling is written).

ZeRO partitions over every rank of the job (dp x sp), as DeepSpeed's own sequence-parallel
support does: the sp ranks of a replica hold different slices of the optimizer state (and, at
stage 3, of the parameters) and gather the same full parameters for the forward.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nsa_dist.training import distributed
from nsa_dist.training.files import load_file, save_atomically
from nsa_dist.parallel import Mesh

ZERO_STAGES = (1, 2, 3)
DEEPSPEED_TAG = "deepspeed"


@dataclass(frozen=True)
class ZeroConfig:
    """The `zero` config section; `stage: null` keeps the plain torch path (no DeepSpeed)."""

    stage: int | None = None
    offload: bool = False  # optimizer state (and at stage 3 the parameters) in CPU memory
    param_persistence_threshold: int = 0  # stage 3: parameters smaller than this stay whole on every rank
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "ZeroConfig":
        if self.stage is not None and self.stage not in ZERO_STAGES:
            raise ValueError(f"zero.stage={self.stage}: choose one of {ZERO_STAGES} (zero=stage1|stage2|stage3), "
                             "or zero=none for the plain torch path")
        if self.offload and self.stage is None:
            raise ValueError("zero.offload needs DeepSpeed: pick zero=stage1|stage2|stage3")
        if self.param_persistence_threshold < 0 or self.reduce_bucket_size <= 0:
            raise ValueError("zero.param_persistence_threshold must be >= 0 and zero.reduce_bucket_size positive")
        return self

    @property
    def enabled(self) -> bool:
        return self.stage is not None


def deepspeed_config(zero: ZeroConfig, *, micro_batch_size: int, grad_clip: float, bf16: bool) -> dict:
    stage_cfg = {"stage": zero.stage, "overlap_comm": zero.overlap_comm, "contiguous_gradients": True,
                 "reduce_bucket_size": zero.reduce_bucket_size}
    if zero.stage == 3:
        stage_cfg["stage3_param_persistence_threshold"] = zero.param_persistence_threshold
    if zero.offload:
        stage_cfg["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero.stage == 3:
            stage_cfg["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": stage_cfg,
        # torch's AdamW: DeepSpeed's fused Adam would compile a C++/CUDA op on first use (~90 s on CPU).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    """The plain torch path: average gradients over the mesh's grad_group, clip, step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float, mesh: Mesh):
        self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.mesh = mesh

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, *, loss_is_finite: bool = True) -> float | None:
        """Average, clip and apply the gradients; returns their global norm (None: not known).

        A non-finite loss or norm leaves the weights and the optimizer state as they were (the
        gradients are dropped): the norm is the same on every rank, after the all-reduce, so every
        rank skips together.
        """
        distributed.average_gradients(self.module, self.mesh.grad_group)
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf")))
        if not (loss_is_finite and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.optimizer.step()
        return norm

    def save(self, directory: Path) -> None:
        # Every rank holds the same weights and optimizer state; one copy is enough.
        if self.mesh.rank == 0:
            save_atomically({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                            directory / "model_optimizer.pt")

    def load(self, directory: Path) -> None:
        state = load_file(directory / "model_optimizer.pt")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def close(self) -> None:
        pass


class DeepSpeedTrainEngine(TrainEngine):
    """DeepSpeed's engine with ZeRO stage 1, 2 or 3 over all ranks; it reduces, clips and steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, zero: ZeroConfig,
                 micro_batch_size: int, grad_clip: float, bf16: bool, mesh: Mesh, local_rank: int = 0):
        self._own_group = _init_deepspeed(local_rank)
        import deepspeed

        config = deepspeed_config(zero, micro_batch_size=micro_batch_size, grad_clip=grad_clip, bf16=bf16)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        super().__init__(model, ds_optimizer, grad_clip=grad_clip, mesh=mesh)
        self.engine = engine
        self.stage = zero.stage

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, *, loss_is_finite: bool = True) -> float | None:
        # DeepSpeed reduces, clips and applies in one call, so a non-finite step cannot be skipped here;
        # the trainer stops instead (trainer.nan_policy=skip is refused with ZeRO).
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        # Every rank writes its own partition; CheckpointDir publishes the directory once all have.
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        # DeepSpeed reads its files with its own torch.load; the resume has already opened every one of
        # them with weights_only=True (nsa_dist.training.checkpoint.verify_checkpoint), so only plain data gets here.
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{DEEPSPEED_TAG}")

    def full_state_dict(self) -> dict:
        """The whole model on every rank (stage 3 gathers the partitions: a collective)."""
        if self.stage != 3:
            return self.module.state_dict()
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {name: t.detach().clone() for name, t in self.module.state_dict().items()}

    def close(self) -> None:
        self.engine.destroy()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def _init_deepspeed(local_rank: int) -> bool:
    """Hand DeepSpeed the job's process group, making a one-rank group when there is none.

    Returns whether the group was made here (and is to be destroyed with the engine).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed's engine asserts LOCAL_RANK is set, as its own launcher and torchrun do; Ray and Slurm
    # ranks have it in their DistributedContext.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    made_here = False
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        made_here = True
    # Reuses the group above; the first call on CPU builds DeepSpeed's shm op (cached in TORCH_EXTENSIONS_DIR).
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return made_here
