"""A Hydra callback that checks, before Hydra's Slurm (submitit) or Ray launcher submits anything, that
the request can be met.

`launcher=slurm` and `launcher=ray` register it (hydra.callbacks.launch_check); Hydra runs it once per
--multirun, before the sweep launcher starts, and it ends the process with the reason and the fix.
Left alone, sbatch queues a job no node can hold and `ray.init` retries a dead address for minutes.
"""
from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nsa_dist.launch.address import check_ray_head
from nsa_dist.launch.config import LauncherConfig
from nsa_dist.launch.slurm import check_slurm_request


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
            # This callback runs before any job, so it converts the one section it needs itself;
            # composed from nsa_dist.conf, the node is typed by LauncherConfig's schema.
            launcher = OmegaConf.to_object(config.launcher)
            if not isinstance(launcher, LauncherConfig):
                launcher = LauncherConfig(**launcher)
            if launcher.loopback:
                # Ray otherwise advertises this node by its default-route address; the launcher's
                # ray.init runs in this process, after this callback.
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            address = config.hydra.launcher.ray.init.get("address")
            if address and address != "auto":
                check_ray_head(str(address), timeout_s=launcher.connect_timeout_s)
