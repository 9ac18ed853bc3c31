"""One harness for the tests that spawn N ranks: a free loopback port, a gloo (or NCCL) group, and each
rank's return value or error back in the test process.

    results = run_ranks(check_everything, world_size=2)   # [rank 0's return value, rank 1's, ...]

`fn(rank, world_size, *args)` runs in a fresh spawned process after `init_process_group`; it must be a
module-level function (spawn imports it by name) and return something picklable. A rank that raises
fails the test with that rank's traceback; the group is destroyed after `fn` either way.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads_per_rank: int = 1, timeout_s: float = 300.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; their return values, by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(fn, world_size, free_port(), backend, threads_per_rank, timeout_s,
                                         args, results),
                       nprocs=world_size, start_method="spawn", join=True)
    by_rank: dict[int, Any] = {}
    errors = []
    while not results.empty():
        rank, ok, payload = results.get()
        if ok:
            by_rank[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    assert not errors, "\n".join(sorted(errors))
    assert sorted(by_rank) == list(range(world_size)), f"ranks that returned nothing: " \
        f"{sorted(set(range(world_size)) - set(by_rank))}"
    return [by_rank[r] for r in range(world_size)]


def _rank_main(rank, fn, world_size, port, backend, threads_per_rank, timeout_s, args, results):
    torch.set_num_threads(threads_per_rank)  # several ranks share a small CI machine
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - the parent reports every rank's failure
        results.put((rank, False, traceback.format_exc()))
