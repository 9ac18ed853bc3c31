"""Sequence-parallel NSA on gloo: the sharded layer equals the single-process layer, forward and backward.

One spawned job per world size runs every check (spawning process groups dominates the time);
each rank also runs the single-process layer on the full sequence as the reference.
"""
from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks

from nsa_dist import NativeSparseAttention, parallelize
from nsa_dist.parallel import ExchangeLog, SequenceParallel, shard, unshard

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float = 0.0) -> float:
    """‖a-b‖/‖b‖, or ‖a-b‖/scale for a `b` below 1e-6 * scale: a gradient that is zero up to rounding
    (~1e-7) has no relative error to speak of, so it is measured against the largest gradient."""
    a, b = a.detach(), b.detach()
    norm = float(b.norm())
    return float((a - b).norm()) / (scale if norm < 1e-6 * scale else max(norm, 1e-30))


def make_layer(seed, *, heads, kv_heads, **kw):
    torch.manual_seed(seed)
    layer = NativeSparseAttention(32, heads, kv_heads, 16, block_len=16, stride=8, **kw)
    with torch.no_grad():  # φ's output layer starts at zero; give it weight so its gradient path is exercised
        for p in layer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return layer


def check_equivalence(sp, name, *, seq_len, batch=1, cu=None, heads=3, kv_heads=3, exchange="all_to_all",
                      fallback=True, x_scale=1.0, seed=0, expect_remote=False, **layer_kw):
    """Sharded output and every gradient (summed over ranks) against the full-sequence layer."""
    sp = dataclasses.replace(sp, exchange=exchange, fallback=fallback, validate=False)
    layer = make_layer(seed, heads=heads, kv_heads=kv_heads, **layer_kw)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seq_len, 32, generator=g) * x_scale
    dy = torch.randn(batch, seq_len, 32, generator=g)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)

    x_ref = x.clone().requires_grad_()
    y_ref = layer(x_ref, cu_seqlens=cu_seqlens)
    (y_ref * dy).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    x_full = x.clone().requires_grad_()
    log = ExchangeLog()
    parallelize(layer, sp, exchange_log=log)
    y_local = layer(shard(x_full, sp), cu_seqlens=cu_seqlens)
    (y_local * shard(dy, sp)).sum().backward()
    y = unshard(y_local.detach(), sp)
    errs = {"out": rel_err(y, y_ref)}
    dist.all_reduce(x_full.grad, group=sp.group)
    errs["dx"] = rel_err(x_full.grad, x_ref.grad)
    # The bias of φ_k's output layer shifts every score of a query alike, which softmax ignores: its
    # gradient is zero up to rounding, measured against the largest gradient (see rel_err).
    scale = max(float(g.norm()) for g in grads_ref.values())
    for n, p in layer.named_parameters():
        dist.all_reduce(p.grad, group=sp.group)
        errs[f"d{n}"] = rel_err(p.grad, grads_ref[n], scale)
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{name} (P={sp.size}, rank {sp.rank}): relative errors above {TOL}: {bad}"
    (stats,) = log.pop()
    if exchange != "all_gather" and not fallback:
        assert stats.mode == exchange, (name, stats)
    if expect_remote:
        fetched = torch.tensor([stats.blocks_fetched])
        dist.all_reduce(fetched, group=sp.group)
        assert fetched.item() > 0, f"{name}: no selection crossed ranks, the case tests nothing"
    return stats


def check_model(sp):
    """The whole decoder on token shards: logits and parameter gradients equal the full-sequence run."""
    from nsa_dist import ModelConfig, NSAConfig, NSATransformer

    torch.manual_seed(0)
    model = NSATransformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=16),
                           NSAConfig(block_len=16, stride=8, select_size=16, top_n=4, window=40))
    tokens = torch.randint(0, 64, (1, 64 * sp.size), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 50, 64 * sp.size], dtype=torch.int32)
    ref = model(tokens, cu_seqlens=cu)
    ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sp = dataclasses.replace(sp, exchange="all_to_all", fallback=False, validate=False)
    log = ExchangeLog()
    parallelize(model, sp, exchange_log=log)
    local = model(shard(tokens, sp), cu_seqlens=cu)
    (local.square().sum() / ref.numel()).backward()
    assert rel_err(unshard(local.detach(), sp), ref) < TOL
    assert [s.mode for s in log.pop()] == ["all_to_all"] * 2 and log.pop() == []  # one byte count per layer
    scale = max(float(g.norm()) for g in grads_ref.values())
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=sp.group)
        assert rel_err(p.grad, grads_ref[n], scale) < TOL, n


def check_bytes(sp):
    """Local selection moves fewer bytes than the all-gather; selecting everything falls back to it."""
    T = 64 * sp.size
    local = check_equivalence(sp, "local selection", seq_len=T, top_n=3, window=16, select_size=16)
    assert local.mode == "all_to_all" and not local.fell_back, local
    assert local.exchange_bytes < local.allgather_bytes, local
    total = torch.tensor([local.exchange_bytes, local.allgather_bytes])
    dist.all_reduce(total, group=sp.group)
    assert total[0] < total[1], total
    everything = check_equivalence(sp, "select everything", seq_len=T, top_n=T // 16, window=16, select_size=16)
    assert everything.mode == "all_gather" and everything.fell_back, everything


def check_shard_roundtrip(sp):
    x = torch.arange(2 * 4 * sp.size * 3, dtype=torch.float32).view(2, 4 * sp.size, 3).requires_grad_()
    local = shard(x, sp)
    c = x.shape[1] // (2 * sp.size)
    assert torch.equal(local[:, :c], x[:, sp.rank * c:(sp.rank + 1) * c])
    full = unshard(local, sp)
    assert torch.equal(full, x)
    full.sum().backward()  # every rank uses the full tensor the same way: each shard gets its slice
    dist.all_reduce(x.grad, group=sp.group)
    assert torch.equal(x.grad, torch.ones_like(x))


def expect_error(fn, *words):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"error message lacks {missing}: {msg}"
        return msg
    raise AssertionError(f"no ValueError (expected one mentioning {words})")


def check_bad_inputs(sp):
    P = sp.size
    layer = make_layer(0, heads=2, kv_heads=1, select_size=16, window=16, top_n=3)
    expect_error(lambda: shard(torch.randn(1, 2 * P * 16 + 2, 32), sp), "zigzag", "pad")
    parallelize(layer, sp)
    expect_error(lambda: layer(torch.randn(1, 40, 32)), "selection blocks", "pad")
    expect_error(lambda: layer(torch.randn(1, 8, 32)), "ranks", "at most")
    # ranks that pass shards of different lengths are caught before any exchange
    bad_len = 32 if sp.rank == 0 else 64
    expect_error(lambda: layer(torch.randn(1, bad_len, 32)), "disagree", "local lengths")


def check_group_mismatch(sp):
    """Rank 0 passes a group of its own while the others pass the world group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    own = [dist.new_group([r]) for r in range(world)]
    group = own[0] if rank == 0 else None
    expect_error(lambda: SequenceParallel(group=group), "differs across ranks", "same group")


def equivalence(name, **kw):
    """A check of the sharded layer on `64 * P` tokens (chunks of 32), `kw` over these defaults."""
    def check(sp):
        T = 64 * sp.size
        cu = [0, 37, T // 2 + 5, T - 11, T]  # documents spanning ranks, not block-aligned
        args = dict(seq_len=T, select_size=16, top_n=4, window=48, fallback=False)  # window 48 > a chunk
        args.update(kw)
        if args.pop("packed", False):
            args["cu"] = cu
        check_equivalence(sp, name, **args)
    return check


CHECKS = {
    "shard/unshard": check_shard_roundtrip,
    "G=1, odd heads": equivalence("G=1, odd heads", heads=3, kv_heads=3),
    "G=4, odd kv heads, batch 2": equivalence("G=4", heads=12, kv_heads=3, batch=2),
    "packed documents": equivalence("packed documents", packed=True, heads=4, kv_heads=1),
    "crossing selections, all_to_all": equivalence("crossing, all_to_all", heads=5, kv_heads=5, top_n=8,
                                                   x_scale=3.0, expect_remote=True),
    "crossing selections, ring": equivalence("crossing, ring", heads=3, kv_heads=3, top_n=8, exchange="ring",
                                             x_scale=3.0, expect_remote=True),
    "crossing selections, ring, packed, G=4": equivalence("crossing, ring, packed", heads=8, kv_heads=2, top_n=8,
                                                          exchange="ring", packed=True, x_scale=3.0,
                                                          expect_remote=True),
    "all-gather baseline": equivalence("all-gather", heads=3, kv_heads=1, exchange="all_gather"),
    "separate K/V, mean φ, select 32, window over 3 chunks": equivalence(
        "separate K/V", heads=4, kv_heads=4, separate_kv=True, compression="mean", select_size=32, top_n=3,
        window=100),
    "no window": equivalence("no window", heads=2, kv_heads=1, window=0),
    "bytes and fallback": check_bytes,
    "model on token shards": check_model,
    "bad inputs": check_bad_inputs,
    "group differs across ranks": check_group_mismatch,
}


def run_checks(rank, world):
    """Every check on one rank, in one order on all ranks; the traceback of each that failed, by name.

    The checks assert after their collectives, so a failing check lets the other ranks go on."""
    sp = SequenceParallel()
    failures = {}
    for name, check in CHECKS.items():
        try:
            check(sp)
            failures[name] = None
        except Exception:  # noqa: BLE001 - reported per check by the test below
            failures[name] = traceback.format_exc()
    dist.barrier()
    return failures


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"P={w}")
def job(request):
    """Run every check in one spawned gloo job of `world` ranks: per rank, the failures by check, or
    why the job stopped."""
    world = request.param
    try:
        return world, run_ranks(run_checks, world, timeout_s=120), None
    except Exception as e:  # noqa: BLE001 - every check then reports the crash
        return world, None, str(e)


@pytest.mark.parametrize("check", list(CHECKS))
def test_sequence_parallel_matches_single_process(job, check):
    world, by_rank, crashed = job
    if crashed:
        pytest.fail(f"the job of {world} ranks stopped before every check ran:\n{crashed}")
    failures = [f"rank {r}:\n{f[check]}" for r, f in enumerate(by_rank) if f[check]]
    if failures:
        pytest.fail("\n".join(failures))
