"""`launcher=ray`: the ranks of one job are Ray actors in a placement group, one bundle (and GPU) each."""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from nsa_dist.launch.address import check_ray_head
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.launch.rank_logging import configure_rank_logging, record_rank_failure, reported_failure

log = logging.getLogger(__name__)


def start_ray_ranks(launcher: LauncherConfig, entry: Callable[..., Any], args: tuple, *, device: str,
                    run_dir: Path) -> Any:
    """Run `entry(*args)` on `launcher.num_workers` actors; rank 0's result.

    Fails before reserving anything when the whole cluster could not hold the job, and stops every
    rank at the first one that fails (the others would wait in a collective until the timeout).
    """
    connect_to_ray(launcher)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = launcher.num_workers
    total = ray.cluster_resources()
    if launcher.use_gpu == "auto":
        use_gpu = total.get("GPU", 0) > 0 and device != "cpu"
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
        calls = {}
        for rank, actor in enumerate(actors):
            env = {"RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(local_ranks[rank]),
                   "LOCAL_WORLD_SIZE": str(nodes.count(nodes[rank])), "MASTER_ADDR": master_addr,
                   "MASTER_PORT": str(master_port), "NSA_DIST_STARTED_BY": "ray"}
            calls[actor.run.remote(entry, args, str(run_dir), env)] = rank
        results = {}
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"rank {calls[done[0]]} of {n} died on Ray: {reason}") from None
            if isinstance(result, _RankFailed):
                raise RuntimeError(result.message)
            results[calls[done[0]]] = result
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
        check_ray_head(launcher.address, timeout_s=launcher.connect_timeout_s)
        ray.init(address=launcher.address)
    elif launcher.address == "auto":
        ray.init(address="auto")
    else:
        ray.init(include_dashboard=False, **({"_node_ip_address": "127.0.0.1"} if launcher.loopback else {}))


class _RankFailed:
    """What a rank returns instead of raising: Ray would print the traceback of every failing actor."""

    def __init__(self, message: str):
        self.message = message


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

    def run(self, entry: Callable[..., Any], args: tuple, run_dir: str, env: dict[str, str]) -> Any:
        os.environ.update(env)
        rank = int(env["RANK"])
        configure_rank_logging(rank, Path(run_dir))
        started = time.perf_counter()
        try:
            return entry(*args)
        except Exception as e:
            with tempfile.TemporaryDirectory() as failures:
                record_rank_failure(e, rank, Path(run_dir), Path(failures))
                return _RankFailed(reported_failure(Path(failures), Path(run_dir)))
        finally:
            log.info("rank %s finished in %.0f s", env["RANK"], time.perf_counter() - started)
