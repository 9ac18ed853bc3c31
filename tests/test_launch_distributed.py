"""The collectives of nsa_dist.distributed on 2 gloo ranks over 127.0.0.1, as a launcher leaves the environment."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from nsa_dist import distributed


def _rank(rank: int, world_size: int, port: int, run_dir: str, errors) -> None:
    try:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
        cfg = OmegaConf.create({"launcher": {"kind": "torchrun", "timeout_s": 60}, "trainer": {"device": "cpu"}})
        ctx = distributed.init_process_group(cfg, run_dir=run_dir)
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (rank, world_size, "gloo", rank == 0)

        torch.manual_seed(rank)  # different weights on each rank until broadcast
        model = torch.nn.Linear(5, 3)
        distributed.broadcast_parameters(model, ctx)
        torch.manual_seed(0)
        expected = torch.nn.Linear(5, 3)
        assert torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)

        # Rank r's gradient is (r + 1) * g, so the mean over ranks is (world_size + 1) / 2 * g.
        model.weight.grad = torch.full((3, 5), float(rank + 1))
        model.bias.grad = None  # a parameter without a gradient stays without one
        distributed.average_gradients(model, ctx)
        assert torch.allclose(model.weight.grad, torch.full((3, 5), (world_size + 1) / 2))
        assert model.bias.grad is None

        mean = distributed.mean_across_ranks(torch.tensor(float(rank)), ctx)
        assert mean == pytest.approx((world_size - 1) / 2)
        distributed.destroy_process_group(ctx)
    except BaseException as e:  # the parent reports it; a child's traceback alone is easy to miss
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def test_two_gloo_ranks_broadcast_average_and_record(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(2, port, str(tmp_path), errors), nprocs=2, start_method="spawn", join=True)
    assert errors.empty(), errors.get()
    record = json.loads((tmp_path / "distributed.json").read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    assert [r["rank"] for r in record["ranks"]] == [0, 1]
    assert len({r["pid"] for r in record["ranks"]}) == 2


def test_single_process_needs_no_group(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_process_group(OmegaConf.create({}), run_dir=tmp_path)
    assert ctx == distributed.SINGLE_PROCESS and not ctx.is_distributed
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    distributed.average_gradients(model, ctx)
    assert torch.equal(model.weight.grad, torch.ones(2, 2))
    assert json.loads((tmp_path / "distributed.json").read_text())["world_size"] == 1
