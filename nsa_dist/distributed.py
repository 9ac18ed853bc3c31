"""Ranks and process groups: started here (torch elastic, Ray) or found in the environment (torchrun, Slurm).

The training entry point makes two calls. `start_ranks(cfg, main, run_dir=...)` runs `main` once per
rank when the `launcher` config section asks this process to start the ranks itself
(`launcher=torchrun`: torch's elastic agent, as `torchrun` does; `launcher=ray`: Ray actors in a
placement group) and returns rank 0's result; it returns None when this process is already a rank.
`init_process_group(cfg, run_dir=...)` then joins the group the environment describes — `RANK`,
`WORLD_SIZE`, `MASTER_*` from torchrun or from `start_ranks`, or `SLURM_*` read through submitit's
`TorchDistributedEnvironment` — and returns a `DistributedContext` that the training loop takes
explicitly. Backends: NCCL when the run trains on GPUs, gloo otherwise.
"""
from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

KINDS = ("local", "torchrun", "ray", "slurm")
BACKENDS = ("auto", "gloo", "nccl")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class LauncherConfig:
    """The `launcher` config section (conf/launcher/*.yaml); each kind reads only its own fields."""

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
        return self


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job; world_size 1 means no process group was made."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    started_by: str = "local"  # local | torchrun | ray | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()


def launcher_config(cfg: DictConfig) -> LauncherConfig:
    """The validated `launcher` section; a config composed without one runs as one local process."""
    node = cfg.get("launcher") if isinstance(cfg, DictConfig) else None
    if node is None:
        return LauncherConfig()
    values = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in dataclasses.fields(LauncherConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting launcher.{unknown[0]}: launcher takes {', '.join(sorted(known))}")
    return LauncherConfig(**values).validate()


def start_ranks(cfg: DictConfig, entry: Callable[..., Any], *, run_dir: Path) -> Any | None:
    """Run `entry(cfg, run_dir=run_dir)` on every rank the launcher asks for and return rank 0's result.

    Returns None when this process should train itself: one local process, a rank that torchrun, Slurm
    or this function already started, or a Slurm task. Fails before starting anything when the
    request cannot be met (more ranks than devices or cluster, no cluster at the address).
    """
    launcher = launcher_config(cfg)
    if _rank_from_environment(launcher) is not None or launcher.kind == "local":
        return None
    entry = _importable(entry)
    if launcher.kind == "slurm":
        raise RuntimeError("launcher=slurm runs each rank as a Slurm task, and this process is not in a Slurm "
                           "job: submit with --multirun (Hydra's submitit launcher) or `sbatch launch/slurm.sbatch`")
    if launcher.kind == "torchrun":
        return _start_with_elastic_agent(launcher, cfg, entry, run_dir)
    return _start_on_ray(launcher, cfg, entry, run_dir)


def init_process_group(cfg: DictConfig, *, run_dir: Path | None = None) -> DistributedContext:
    """Join the process group the environment describes; write `distributed.json` (rank 0) to run_dir."""
    launcher = launcher_config(cfg)
    started_by = _rank_from_environment(launcher)
    if started_by is None:
        ctx = SINGLE_PROCESS
    else:
        if started_by == "slurm":
            _export_slurm_rendezvous()
        ctx = _join(launcher, started_by, trainer_device=_trainer_device(cfg))
    if run_dir is not None:
        _record_membership(ctx, Path(run_dir))
    return ctx


def destroy_process_group(ctx: DistributedContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Every rank starts from rank 0's weights, whatever its own initialisation drew."""
    if not ctx.is_distributed:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, src=0)


def average_gradients(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Data parallelism: replace each gradient by its mean over the ranks, in one flat all-reduce."""
    if not ctx.is_distributed:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_across_ranks(value: torch.Tensor, ctx: DistributedContext) -> float:
    """The mean of a scalar over the ranks, as a Python float (a host sync)."""
    if not ctx.is_distributed:
        return float(value)
    total = value.detach().clone().float().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / ctx.world_size


def check_reachable(address: str, *, timeout_s: float, what: str) -> None:
    """Fail in seconds on a dead `host:port`; Ray's own connect waits minutes before it gives up."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        raise ConnectionError(f"no {what} answers at {host}:{port} ({e.strerror or e}): start one "
                              f"(`bash launch/ci/start_ray.sh` for a local Ray head) or fix the address") from e


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _rank_from_environment(launcher: LauncherConfig) -> str | None:
    """Who started this process as a rank, or None if it was not started as one."""
    env = os.environ
    if launcher.kind == "slurm" and "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return "slurm"
    if "RANK" in env and "WORLD_SIZE" in env:
        return env.get("NSA_DIST_STARTED_BY", "torchrun")
    return None


def _export_slurm_rendezvous() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM_*, as submitit computes them."""
    from submitit.helpers import TorchDistributedEnvironment

    # submitit reads SLURM_* only once told it runs under Slurm; its own jobs set this, plain srun does not.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    # The port is derived from the job id, so every task of the job agrees on it without talking.
    # CUDA_VISIBLE_DEVICES is left alone: with one task per GPU Slurm has already narrowed it.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _trainer_device(cfg: DictConfig) -> str:
    trainer = cfg.get("trainer") if isinstance(cfg, DictConfig) else None
    return str(trainer.get("device", "auto")) if trainer is not None else "auto"


def _join(launcher: LauncherConfig, started_by: str, *, trainer_device: str) -> DistributedContext:
    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    uses_cuda = trainer_device == "cuda" or (trainer_device == "auto" and torch.cuda.is_available())
    backend = launcher.backend if launcher.backend != "auto" else ("nccl" if uses_cuda else "gloo")
    if world_size == 1:
        return DistributedContext(started_by=started_by)
    if "OMP_NUM_THREADS" not in env:
        # Ranks sharing a host would each take a thread per core; oversubscribed, the spinning
        # OpenMP threads slow CPU training by an order of magnitude.
        ranks_here = int(env.get("LOCAL_WORLD_SIZE", 1))
        per_rank = int(env.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1) // ranks_here
        torch.set_num_threads(max(1, per_rank))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("launcher.backend=nccl needs CUDA devices and none is visible: use gloo")
        # A launcher that narrows CUDA_VISIBLE_DEVICES to one GPU per rank (Ray, Slurm gpus-per-task)
        # leaves that GPU as device 0; otherwise the local rank picks it.
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > 1 else 0)
    master_addr = env.get("MASTER_ADDR", "")
    one_host = int(env.get("LOCAL_WORLD_SIZE", world_size)) == world_size
    if one_host and _is_loopback(master_addr):
        # gloo otherwise listens on whatever the hostname resolves to, which may not be loopback.
        # Only when every rank is here: Debian maps a node's own name to 127.0.1.1, which would
        # pin rank 0 of a multi-node job to an interface the other nodes cannot reach.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    log.info("rank %d of %d joining the %s group at %s:%s (started by %s)", rank, world_size, backend,
             master_addr, env.get("MASTER_PORT", "?"), started_by)
    if dist.is_initialized():
        backend = dist.get_backend()  # the caller made the group already; join it as it is
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=launcher.timeout_s))
    if rank != 0:
        # Rank 0 speaks for the job; the others report only problems.
        logging.getLogger().setLevel(logging.WARNING)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                              started_by=started_by)


def _record_membership(ctx: DistributedContext, run_dir: Path) -> None:
    """Every rank reports host and pid through the group; rank 0 writes them, proof the group formed."""
    me = {"rank": ctx.rank, "host": socket.gethostname(), "pid": os.getpid()}
    members = [me]
    if ctx.is_distributed:
        members = [None] * ctx.world_size
        dist.all_gather_object(members, me)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"world_size": ctx.world_size, "backend": ctx.backend, "started_by": ctx.started_by,
                  "ranks": members}
        tmp = run_dir / "distributed.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, run_dir / "distributed.json")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _importable(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Under `python -m pkg.mod`, `main` lives in __main__, which other processes cannot import by that name."""
    if getattr(entry, "__module__", None) != "__main__":
        return entry
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        return entry
    return getattr(importlib.import_module(spec.name), entry.__qualname__, entry)


def _plain_config(cfg: DictConfig) -> DictConfig:
    """The config with every interpolation resolved, so ranks in other processes need no Hydra state."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    return OmegaConf.create(values)


def _configure_rank_logging(rank: int, run_dir: Path) -> None:
    """A freshly started rank has no Hydra logging: log to stderr and to run_dir/rank<r>.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / f"rank{rank}.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _cuda_requested(cfg: DictConfig) -> bool:
    device = _trainer_device(cfg)
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _start_with_elastic_agent(launcher: LauncherConfig, cfg: DictConfig, entry: Callable[..., Any],
                              run_dir: Path) -> Any:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = launcher.nproc_per_node
    if _cuda_requested(cfg):
        if nproc > torch.cuda.device_count():
            raise ValueError(f"launcher.nproc_per_node={nproc} asks for one GPU per rank but this host has "
                             f"{torch.cuda.device_count()}: lower launcher.nproc_per_node")
    elif nproc > (os.cpu_count() or 1):
        raise ValueError(f"launcher.nproc_per_node={nproc} is more ranks than this host's {os.cpu_count()} CPU "
                         f"cores: lower launcher.nproc_per_node")
    if launcher.nnodes > 1 and split_address(launcher.rdzv_endpoint)[1] == 0:
        raise ValueError("launcher.nnodes > 1 needs a fixed rendezvous port every node can reach: "
                         "set launcher.rdzv_endpoint=<first node>:29500")
    host, _ = split_address(launcher.rdzv_endpoint)
    config = LaunchConfig(
        min_nodes=launcher.nnodes, max_nodes=launcher.nnodes, nproc_per_node=nproc,
        run_id=launcher.rdzv_id, rdzv_backend=launcher.rdzv_backend, rdzv_endpoint=launcher.rdzv_endpoint,
        rdzv_configs={"join_timeout": launcher.rdzv_timeout_s}, max_restarts=launcher.max_restarts,
        monitor_interval=0.5, start_method="spawn",
        # The address this node advertises to the others; on one node, keep everything on loopback.
        local_addr=host if launcher.nnodes == 1 else None,
    )
    log.info("starting %d ranks on this node (%d node(s), rendezvous %s)", nproc, launcher.nnodes,
             launcher.rdzv_endpoint)
    results = elastic_launch(config, _elastic_rank)(entry, _plain_config(cfg), str(run_dir))
    # Keyed by global rank: on the first node that includes rank 0, on the others their lowest rank.
    return results[min(results)]


def _elastic_rank(entry: Callable[..., Any], cfg: DictConfig, run_dir: str) -> Any:
    _configure_rank_logging(int(os.environ["RANK"]), Path(run_dir))
    return entry(cfg, run_dir=Path(run_dir))


def _start_on_ray(launcher: LauncherConfig, cfg: DictConfig, entry: Callable[..., Any], run_dir: Path) -> Any:
    connect_to_ray(launcher)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = launcher.num_workers
    total = ray.cluster_resources()
    if launcher.use_gpu == "auto":
        use_gpu = total.get("GPU", 0) > 0 and _trainer_device(cfg) != "cpu"
    else:
        use_gpu = launcher.use_gpu
    bundle = {"CPU": launcher.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    short = {k: (v * n, total.get(k, 0)) for k, v in bundle.items() if v * n > total.get(k, 0)}
    if short:
        have = ", ".join(f"{have:g} {k}" for k, (_, have) in short.items())
        need = ", ".join(f"{need:g} {k}" for k, (need, _) in short.items())
        raise ValueError(f"launcher.num_workers={n} needs {need} but the whole Ray cluster has {have}: lower "
                         f"launcher.num_workers (or launcher.cpus_per_worker), or add nodes to the cluster")

    group = placement_group([bundle] * n, strategy=launcher.placement_strategy)
    actors = []
    try:
        try:
            ray.get(group.ready(), timeout=launcher.placement_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"Ray could not reserve {n} x {bundle} within launcher.placement_timeout_s="
                               f"{launcher.placement_timeout_s:g}s; other jobs hold the cluster (`ray status`)") from e
        rank_actor = ray.remote(_RayRank)
        for rank in range(n):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank)
            actors.append(rank_actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                             scheduling_strategy=strategy).remote())
        master_addr, master_port = ray.get(actors[0].rendezvous_address.remote())
        nodes = ray.get([a.node_ip.remote() for a in actors])
        local_ranks = [nodes[:rank].count(node) for rank, node in enumerate(nodes)]
        log.info("starting %d ranks as Ray actors on %s; rendezvous %s:%d", n, sorted(set(nodes)),
                 master_addr, master_port)
        plain = _plain_config(cfg)
        calls = {}
        for rank, actor in enumerate(actors):
            env = {"RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(local_ranks[rank]),
                   "LOCAL_WORLD_SIZE": str(nodes.count(nodes[rank])), "MASTER_ADDR": master_addr,
                   "MASTER_PORT": str(master_port), "NSA_DIST_STARTED_BY": "ray"}
            calls[actor.run.remote(entry, plain, str(run_dir), env)] = rank
        results = {}
        pending = list(calls)
        while pending:
            # One failed rank would leave the others blocked in a collective: stop at the first failure.
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[calls[done[0]]] = ray.get(done[0])
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"rank {calls[done[0]]} of {n} failed on Ray: {e}") from e
        return results[0]
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def connect_to_ray(launcher: LauncherConfig) -> None:
    """Join the cluster at launcher.address, or start a private one on this machine when it is null."""
    if launcher.loopback:
        # Ray otherwise advertises the node by its default-route address even when told 127.0.0.1.
        # Ray reads it at import, and a private cluster's processes inherit it: set it before both.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if launcher.address and launcher.address != "auto":
        check_reachable(launcher.address, timeout_s=launcher.connect_timeout_s, what="Ray cluster")
        ray.init(address=launcher.address)
    elif launcher.address == "auto":
        ray.init(address="auto")
    else:
        ray.init(include_dashboard=False, **({"_node_ip_address": "127.0.0.1"} if launcher.loopback else {}))


class _RayRank:
    """One rank of the job: a Ray actor holding one bundle (one GPU when the cluster has GPUs)."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it, for the other ranks to meet rank 0's store."""
        addr = self.node_ip()
        with socket.socket() as s:
            s.bind((addr, 0))
            return addr, s.getsockname()[1]

    def run(self, entry: Callable[..., Any], cfg: DictConfig, run_dir: str, env: dict[str, str]) -> Any:
        os.environ.update(env)
        _configure_rank_logging(int(env["RANK"]), Path(run_dir))
        started = time.perf_counter()
        try:
            return entry(cfg, run_dir=Path(run_dir))
        finally:
            log.info("rank %s finished in %.0f s", env["RANK"], time.perf_counter() - started)


class Discard:
    """Stands in for a rank-0-only object (the TensorBoard writer) on the other ranks: every call is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
