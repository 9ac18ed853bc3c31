"""`launcher=torchrun`: this node's ranks started by torch's elastic agent, as the `torchrun` command does."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from nsa_dist.launch.address import split_address
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.launch.rank_logging import configure_rank_logging, record_rank_failure, reported_failure

log = logging.getLogger(__name__)


def start_elastic_ranks(launcher: LauncherConfig, entry: Callable[..., Any], args: tuple, *, device: str,
                        run_dir: Path) -> Any:
    """Run `entry(*args)` on `launcher.nproc_per_node` ranks of this node; the lowest rank's result.

    `device` is trainer.device: with CUDA each rank takes one GPU, so there must be as many.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = launcher.nproc_per_node
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # A failing rank is reported below, once. The agent would log its exit with a traceback, and the
    # process context a warning for each rank it then terminates.
    agent_logs = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing.spawn")]
    agent_levels = [agent_log.level for agent_log in agent_logs]
    with tempfile.TemporaryDirectory(prefix="nsa_dist_failures_") as failures:
        try:
            for agent_log in agent_logs:
                agent_log.setLevel(logging.CRITICAL)
            results = elastic_launch(config, _elastic_rank)(entry, args, str(run_dir), failures)
        except ChildFailedError as e:
            message = reported_failure(Path(failures), run_dir)
            raise RuntimeError(message or f"a rank died without a message: {e.get_first_failure()[1]}") from None
        finally:
            for agent_log, level in zip(agent_logs, agent_levels):
                agent_log.setLevel(level)
    # Keyed by global rank: on the first node that includes rank 0, on the others their lowest rank.
    return results[min(results)]


def _elastic_rank(entry: Callable[..., Any], args: tuple, run_dir: str, failures_dir: str) -> Any:
    rank = int(os.environ["RANK"])
    configure_rank_logging(rank, Path(run_dir))
    try:
        return entry(*args)
    except Exception as e:
        record_rank_failure(e, rank, Path(run_dir), Path(failures_dir))
        # Not an Exception: torch's process wrappers print the traceback of one, and the agent again.
        raise SystemExit(1) from None
