"""Checks, before Hydra's Slurm (submitit) or Ray launcher submits anything, that the request can be met.

Left alone, both wait forever on a request that never can be: sbatch queues a job that asks for more
CPUs or GPUs than the partition's nodes have (unless the site enforces partition limits), and
`ray.init` retries a dead address for minutes. `LaunchCheck` is a Hydra callback that
`launcher=slurm` and `launcher=ray` register (hydra.callbacks.launch_check); Hydra runs it once per
--multirun, before the launcher starts, and it ends the process with the reason and the fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nsa_dist.distributed import check_reachable, launcher_config


class LaunchCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.check(config)
        except (ValueError, ConnectionError, RuntimeError) as e:
            # Hydra turns an exception from a callback into a warning and launches anyway.
            raise SystemExit(f"nsa_dist: cannot launch: {e}") from e

    @staticmethod
    def check(config: DictConfig) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.endswith("submitit_launcher.SlurmLauncher"):
            params = config.hydra.launcher
            check_slurm_request(partition=params.get("partition"), nodes=int(params.get("nodes") or 1),
                                tasks_per_node=int(params.get("tasks_per_node") or 1),
                                cpus_per_task=int(params.get("cpus_per_task") or 1),
                                gpus_per_node=int(params.get("gpus_per_node") or 0))
        elif target.endswith("ray_launcher.RayLauncher"):
            launcher = launcher_config(config)
            if launcher.loopback:
                # Ray otherwise advertises this node by its default-route address; the launcher's
                # ray.init runs in this process, after this callback.
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            address = config.hydra.launcher.ray.init.get("address")
            if address and address != "auto":
                check_reachable(str(address), timeout_s=launcher.connect_timeout_s, what="Ray cluster")


def check_slurm_request(*, partition: str | None, nodes: int, tasks_per_node: int, cpus_per_task: int,
                        gpus_per_node: int) -> None:
    """Raise ValueError naming the fix if the partition is unknown or none of its nodes could hold the job."""
    if shutil.which("sinfo") is None:
        raise RuntimeError("launcher=slurm needs the Slurm client commands (sinfo, sbatch) on PATH")
    nodes_info = _partition_nodes(partition)
    name = partition or "the default partition"
    if not nodes_info:
        known = _partitions()
        raise ValueError(f"Slurm has no partition {partition!r}: set hydra.launcher.partition to one of "
                         f"{', '.join(known) or '(none found: is slurmctld up? try `sinfo`)'}")
    if nodes > len(nodes_info):
        raise ValueError(f"hydra.launcher.nodes={nodes} but {name} has {len(nodes_info)} node(s): lower it")
    cpus_needed = tasks_per_node * cpus_per_task
    fit = [n for n in nodes_info if n["cpus"] >= cpus_needed and n["gpus"] >= gpus_per_node]
    if len(fit) < nodes:
        most_cpus = max(n["cpus"] for n in nodes_info)
        most_gpus = max(n["gpus"] for n in nodes_info)
        raise ValueError(
            f"{nodes} node(s) with {tasks_per_node} tasks x {cpus_per_task} CPUs and {gpus_per_node} GPUs each "
            f"cannot fit {name}, whose largest node has {most_cpus} CPUs and {most_gpus} GPUs: lower "
            f"hydra.launcher.tasks_per_node (one rank per task) or cpus_per_task, or choose another partition")


def _partition_nodes(partition: str | None) -> list[dict[str, Any]]:
    args = ["sinfo", "--noheader", "--Node", "--format=%N|%c|%G|%P"]
    if partition:
        args.append(f"--partition={partition}")
    out = _run(args)
    rows = {}
    for line in out.splitlines():
        node, cpus, gres, part = line.split("|")
        if partition is None and not part.endswith("*"):
            continue
        rows[node] = {"cpus": int(cpus), "gpus": _gpus_in_gres(gres)}
    return list(rows.values())


def _partitions() -> list[str]:
    # sinfo marks the default partition with a trailing '*'.
    return sorted({line.strip().rstrip("*") for line in _run(["sinfo", "--noheader", "--format=%P"]).splitlines()
                   if line.strip()})


def _gpus_in_gres(gres: str) -> int:
    """`gpu:8`, `gpu:a100:4(S:0-1)`, `(null)` -> 8, 4, 0."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{' '.join(args)}` did not answer in 30 s: is slurmctld reachable?") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(args)}` failed: {e.stderr.strip() or e.stdout.strip()}") from e
    return done.stdout
