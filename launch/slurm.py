"""Slurm: ranks are the tasks of one job (srun, or Hydra's submitit launcher); their rendezvous comes
from `SLURM_*`. Also the check that a request fits the partition before anything is submitted:
left alone, sbatch queues a job that asks for more CPUs or GPUs than the partition's nodes have
(unless the site enforces partition limits), and it waits forever.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any


def in_slurm_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ


def export_rendezvous() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM_*, as submitit computes them."""
    from submitit.helpers import TorchDistributedEnvironment

    # submitit reads SLURM_* only once told it runs under Slurm; its own jobs set this, plain srun does not.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    # The port is derived from the job id, so every task of the job agrees on it without talking.
    # CUDA_VISIBLE_DEVICES is left alone: with one task per GPU Slurm has already narrowed it.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["NSA_DIST_STARTED_BY"] = "slurm"


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
        rows[node] = {"cpus": int(cpus), "gpus": gpus_in_gres(gres)}
    return list(rows.values())


def _partitions() -> list[str]:
    # sinfo marks the default partition with a trailing '*'.
    return sorted({line.strip().rstrip("*") for line in _run(["sinfo", "--noheader", "--format=%P"]).splitlines()
                   if line.strip()})


def gpus_in_gres(gres: str) -> int:
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
