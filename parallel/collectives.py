"""Differentiable collectives along dim 0: each one's backward is the reverse exchange.

Each takes a `timer`, a context manager that every transfer (forward and backward) runs inside:
`UNTIMED` by default, a `parallel.state.Stopwatch` when the caller times its collectives.

Written here rather than taken from torch.distributed.nn so that the gradient rule is explicit:
a block sent from `s` to `d` sends its gradient from `d` back to `s`, where autograd (through
the `index_select` / `repeat` that built the send buffer) sums the copies.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import UNTIMED


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], sp, timer=UNTIMED) -> torch.Tensor:
    """`x [sum(send_splits), ...]`, rows grouped by destination rank → rows grouped by source rank."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), sp, timer)


def ring_all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], sp,
                    timer=UNTIMED) -> torch.Tensor:
    """Same result as `all_to_all`, moved in `P-1` point-to-point steps: step `s` sends to `r+s` and
    receives from `r-s`, so each link carries one peer's blocks at a time; step `s+1` is posted
    before step `s` is waited on."""
    return _RingAllToAll.apply(x, list(send_splits), list(recv_splits), sp, timer)


def _all_to_all(x, send_splits, recv_splits, sp):
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_splits, send_splits, group=sp.group)
    return out


def _ring(x, send_splits, recv_splits, sp, direction: int):
    x = x.contiguous()
    P, r = sp.size, sp.rank
    sends = list(x.split(send_splits))
    recvs = [x.new_empty((n, *x.shape[1:])) for n in recv_splits]
    recvs[r].copy_(sends[r])
    pending = []
    for s in range(1, P):
        dst, src = (r + direction * s) % P, (r - direction * s) % P
        ops = []
        if send_splits[dst]:
            ops.append(dist.P2POp(dist.isend, sends[dst], sp.global_rank(dst), sp.group))
        if recv_splits[src]:
            ops.append(dist.P2POp(dist.irecv, recvs[src], sp.global_rank(src), sp.group))
        reqs = dist.batch_isend_irecv(ops) if ops else []
        for req in pending:
            req.wait()
        pending = reqs
    for req in pending:
        req.wait()
    return torch.cat(recvs) if recvs else x.new_empty((0, *x.shape[1:]))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, sp, timer):
        ctx.splits, ctx.sp, ctx.timer = (send_splits, recv_splits), sp, timer
        with timer:
            return _all_to_all(x, send_splits, recv_splits, sp)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        with ctx.timer:
            return _all_to_all(grad, recv_splits, send_splits, ctx.sp), None, None, None, None


class _RingAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, sp, timer):
        ctx.splits, ctx.sp, ctx.timer = (send_splits, recv_splits), sp, timer
        with timer:
            return _ring(x, send_splits, recv_splits, sp, direction=1)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        with ctx.timer:
            return _ring(grad, recv_splits, send_splits, ctx.sp, direction=-1), None, None, None, None


def all_gather_ints(values, sp, timer=UNTIMED) -> list[list[int]]:
    """Every rank's `values` (a list of ints or an integer tensor, same length on every rank) as
    Python ints; one host sync, after the collective."""
    device = collective_device(sp.group)
    mine = torch.as_tensor(values, dtype=torch.int64).to(device)
    out = [torch.empty_like(mine) for _ in range(sp.size)]
    with timer:
        dist.all_gather(out, mine, group=sp.group)
        return torch.stack(out).tolist()  # host sync: splits of the following collectives are host ints


def collective_device(group) -> torch.device:
    """Where tensors of a collective on `group` live: the current GPU for NCCL, the CPU otherwise."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
