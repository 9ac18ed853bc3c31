"""Sequence-parallel NSA on 2 and 4 GPUs with NCCL, bf16: the sharded layer against one GPU.

Each rank runs the same layer on the full sequence in fp32 (the reference) and on its zigzag
shard in bf16 through NCCL; output and every gradient (summed over ranks) must agree within bf16
tolerance. Top-n is discrete, so bf16 rounding may flip a near-tied block choice for a few
queries: the tolerance is on the relative norm over the whole tensor.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

TOL_OUT = 3e-2
TOL_GRAD = 5e-2


def rel(a, b, floor=0.0):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the sharded result"
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-30))


def check_case(sp, name, *, seq_len, cu=None, heads=8, kv_heads=2, exchange="all_to_all", fallback=False,
               backend="auto", seed=0, **nsa):
    from nsa_dist import NativeSparseAttention, parallelize
    from nsa_dist.parallel import ExchangeLog, shard, unshard

    sp = dataclasses.replace(sp, exchange=exchange, fallback=fallback, validate=False)
    torch.manual_seed(seed)
    ref_layer = NativeSparseAttention(256, heads, kv_heads, 64, backend="torch", **nsa).cuda()
    layer = NativeSparseAttention(256, heads, kv_heads, 64, backend=backend, **nsa).cuda()
    layer.load_state_dict(ref_layer.state_dict())
    layer.to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(1, seq_len, 256, device="cuda", generator=g)
    dy = torch.randn(1, seq_len, 256, device="cuda", generator=g)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")

    x_ref = x.clone().requires_grad_()
    y_ref = ref_layer(x_ref, cu_seqlens=cu_seqlens)
    (y_ref * dy).sum().backward()

    x_bf = x.to(torch.bfloat16).requires_grad_()
    log = ExchangeLog()
    parallelize(layer, sp, exchange_log=log)
    y_local = layer(shard(x_bf, sp), cu_seqlens=cu_seqlens)
    (y_local.float() * shard(dy, sp)).sum().backward()
    errs = {"out": (rel(unshard(y_local.detach(), sp), y_ref), TOL_OUT)}
    dist.all_reduce(x_bf.grad, group=sp.group)
    errs["dx"] = (rel(x_bf.grad, x_ref.grad), TOL_GRAD)
    ref_grads = dict(ref_layer.named_parameters())
    # φ_k's output bias has a zero gradient up to rounding (softmax ignores a shift of every score), and
    # bf16 makes small gradients noisy: under 1e-3 of the largest, they are measured against that.
    floor = 1e-3 * max(float(p.grad.norm()) for p in ref_grads.values())
    for n, p in layer.named_parameters():
        grad = p.grad.float()
        dist.all_reduce(grad, group=sp.group)
        errs[f"d{n}"] = (rel(grad, ref_grads[n].grad, floor), TOL_GRAD)
    bad = {k: round(e, 5) for k, (e, tol) in errs.items() if not e < tol}
    assert not bad, f"{name} (P={sp.size}, rank {sp.rank}): relative errors above tolerance: {bad}"
    (stats,) = log.pop()
    return stats


def run_cases(rank, world):
    from nsa_dist.parallel import SequenceParallel

    sp = SequenceParallel()
    T = 1024 * world  # chunks of 512 tokens; the window of 768 reaches over one chunk
    base = dict(seq_len=T, block_len=32, stride=16, select_size=64, top_n=8, window=768)
    check_case(sp, "G=4", heads=8, kv_heads=2, **base)
    check_case(sp, "G=1, odd heads", heads=5, kv_heads=5, **base)
    check_case(sp, "packed documents", cu=[0, 300, T // 2 + 77, T - 200, T], heads=8, kv_heads=2, **base)
    check_case(sp, "all-gather baseline", exchange="all_gather", **base)
    check_case(sp, "ring", exchange="ring", **base)
    local = check_case(sp, "local selection, auto fallback", fallback=True, **{**base, "top_n": 3})
    assert local.exchange_bytes < local.allgather_bytes, local
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_nccl_matches_one_gpu(world):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    run_ranks(run_cases, world, backend="nccl")
