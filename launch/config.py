"""The `launcher` section of the run config (conf/launcher/*.yaml): how the ranks of one job start."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("local", "torchrun", "ray", "slurm")
BACKENDS = ("auto", "gloo", "nccl")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# The fields only one kind reads: set for another kind, they would be ignored without a word.
KIND_FIELDS = {"torchrun": ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_timeout_s",
                            "max_restarts"),
               "ray": ("num_workers", "address", "use_gpu", "cpus_per_worker", "placement_strategy",
                       "placement_timeout_s", "connect_timeout_s", "loopback")}


@dataclass(frozen=True)
class LauncherConfig:
    """One flat section for every kind; each kind reads only its own fields."""

    kind: str = "local"
    backend: str = "auto"
    timeout_s: float = 600.0  # a collective waiting longer than this raises instead of hanging
    # torchrun: ranks started by torch's elastic agent
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = "127.0.0.1:0"
    rdzv_backend: str = "c10d"
    rdzv_id: str = "nsa_dist"
    rdzv_timeout_s: float = 600.0
    max_restarts: int = 0
    # ray: ranks are actors in one placement group
    num_workers: int = 1
    address: str | None = None
    use_gpu: bool | str = "auto"
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    loopback: bool = True

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "LauncherConfig":
        if self.kind not in KINDS:
            raise ValueError(f"unknown launcher.kind={self.kind!r}: choose launcher=local|torchrun|ray|slurm")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown launcher.backend={self.backend!r}: choose one of {BACKENDS}")
        for name in ("nproc_per_node", "nnodes", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"launcher.{name} must be at least 1, got {getattr(self, name)}")
        if self.use_gpu not in (True, False, "auto"):
            raise ValueError(f"launcher.use_gpu must be true, false or auto, got {self.use_gpu!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"unknown launcher.placement_strategy={self.placement_strategy!r}: "
                             f"choose one of {PLACEMENT_STRATEGIES}")
        defaults = LauncherConfig.__dataclass_fields__
        for kind, names in KIND_FIELDS.items():
            if kind == self.kind:
                continue
            for name in names:
                if getattr(self, name) == defaults[name].default or self._same_rank_count(name):
                    continue
                raise ValueError(f"launcher.{name}={getattr(self, name)} is read by launcher={kind} only, and this "
                                 f"run has launcher={self.kind}: add launcher={kind}, or drop the setting")
        return self

    def _same_rank_count(self, name: str) -> bool:
        """A rank count set for another launcher that agrees with this one's: the scaling experiments tie both
        to parallel.sp_size so that either launcher runs them (Slurm's count is known in the job only)."""
        if name not in ("nproc_per_node", "num_workers") or self.kind == "local":
            return False
        own = {"torchrun": self.nproc_per_node * self.nnodes, "ray": self.num_workers}.get(self.kind)
        return own is None or getattr(self, name) == own
