"""nsa_dist.training.distributed on 2 gloo ranks over 127.0.0.1, as a launcher leaves the environment."""
import json
import os

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks

from nsa_dist.training import distributed
from nsa_dist.launch import LauncherConfig, started_by


def _join_and_collect(rank: int, world_size: int, run_dir: str) -> dict:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"})
    ctx = distributed.init_process_group(backend="auto", timeout_s=60, device="cpu", run_dir=run_dir)

    torch.manual_seed(rank)  # different weights on each rank until broadcast
    model = torch.nn.Linear(5, 3)
    distributed.broadcast_parameters(model, ctx)
    torch.manual_seed(0)
    expected = torch.nn.Linear(5, 3)
    broadcast = torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)

    # Rank r's gradient is (r + 1) * g, so the mean over ranks is (world_size + 1) / 2 * g.
    model.weight.grad = torch.full((3, 5), float(rank + 1))
    model.bias.grad = None  # a parameter without a gradient stays without one
    distributed.average_gradients(model, dist.group.WORLD)
    return {"ctx": (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.started_by), "broadcast": broadcast,
            "grad": model.weight.grad.unique().tolist(), "bias_grad": model.bias.grad,
            "mean": distributed.mean_across_ranks(torch.tensor(float(rank)), dist.group.WORLD),
            "world": distributed.mean_across_ranks(torch.tensor(float(rank)), None)}


def test_two_gloo_ranks_broadcast_average_and_record(tmp_path):
    results = run_ranks(_join_and_collect, 2, str(tmp_path))
    for rank, got in enumerate(results):
        assert got["ctx"] == (rank, 2, "gloo", rank == 0, "torchrun")
        assert got["broadcast"] and got["grad"] == [1.5] and got["bias_grad"] is None
        assert got["mean"] == pytest.approx(0.5) and got["world"] == pytest.approx(0.5)  # None: the world, as in torch
    record = json.loads((tmp_path / "distributed.json").read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    assert [r["rank"] for r in record["ranks"]] == [0, 1]
    assert len({r["pid"] for r in record["ranks"]}) == 2


def test_single_process_needs_no_group(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_process_group(run_dir=tmp_path)
    assert ctx == distributed.SINGLE_PROCESS and not ctx.is_distributed
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    distributed.average_gradients(model, None)
    assert torch.equal(model.weight.grad, torch.ones(2, 2))
    assert json.loads((tmp_path / "distributed.json").read_text())["world_size"] == 1


def test_who_started_this_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "NSA_DIST_STARTED_BY", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert started_by(LauncherConfig(kind="torchrun")) is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert started_by(LauncherConfig(kind="slurm")) == "slurm"
    assert started_by(LauncherConfig(kind="local")) is None  # one process inside an allocation
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert started_by(LauncherConfig(kind="local")) == "torchrun"
    monkeypatch.setenv("NSA_DIST_STARTED_BY", "ray")
    assert started_by(LauncherConfig(kind="ray")) == "ray"
