"""Communication timers of the sequence-parallel layer (2 gloo ranks): a timed ExchangeLog records the
seconds of each collective that ran, forward and backward; an untimed one records none; timing changes
no output and no gradient."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from multirank import run_ranks

from nsa_dist import NativeSparseAttention, parallelize
from nsa_dist.training.metrics import exchange_totals
from nsa_dist.parallel import COLLECTIVES, ExchangeLog, ExchangeStats, ParallelConfig, SequenceParallel, shard
from nsa_dist.parallel.state import UNTIMED, Stopwatch, stopwatches

# (exchange, fallback, top_n): the three ways selected K/V move, and the fallback to the all-gather
MODES = {"all_to_all": ("all_to_all", False, 8), "ring": ("ring", False, 8), "all_gather": ("all_gather", True, 4),
         "fallback": ("all_to_all", True, 16)}


def run_layer(sp, exchange, fallback, top_n, timed):
    """Output, input and parameter gradients of one sharded layer call, the log's stats after the
    forward (a copy of `seconds`) and the stats object itself, read again after the backward."""
    sp = dataclasses.replace(sp, exchange=exchange, fallback=fallback, validate=False)
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, 4, 2, 16, block_len=16, stride=8, select_size=16, top_n=top_n, window=48)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 64 * sp.size, 32, generator=g) * 3.0).requires_grad_()
    log = ExchangeLog(timed=timed)
    parallelize(layer, sp, exchange_log=log)
    y = layer(shard(x, sp))
    (stats,) = log.pop()
    after_forward = dict(stats.seconds)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.clone(), grads, after_forward, stats


def check_timers(rank, world):
    sp = SequenceParallel()
    report = {}
    for name, (exchange, fallback, top_n) in MODES.items():
        y0, dx0, grads0, forward0, untimed = run_layer(sp, exchange, fallback, top_n, timed=False)
        y1, dx1, grads1, forward1, timed = run_layer(sp, exchange, fallback, top_n, timed=True)
        report[name] = {
            "same output": torch.equal(y0, y1),
            "same input grad": torch.equal(dx0, dx1),
            "same param grads": all(torch.equal(grads0[n], grads1[n]) for n in grads0),
            "untimed seconds": dict(untimed.seconds),
            "timed forward": forward1,
            "timed": dict(timed.seconds),
            "mode": timed.mode,
            "fell back": timed.fell_back,
        }
    return report


@pytest.fixture(scope="module")
def reports():
    return run_ranks(check_timers, 2, timeout_s=120)


@pytest.mark.parametrize("mode", list(MODES))
def test_timing_changes_no_output_and_no_gradient(reports, mode):
    for rank, report in enumerate(reports):
        r = report[mode]
        assert r["same output"] and r["same input grad"] and r["same param grads"], (rank, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_timed_log_has_positive_seconds_for_every_collective_and_the_backward_adds_to_them(reports, mode):
    for rank, report in enumerate(reports):
        r = report[mode]
        assert set(r["timed"]) == set(COLLECTIVES), (rank, mode, r["timed"])
        assert all(s > 0 for s in r["timed"].values()), (rank, mode, r["timed"])
        # the backward's reverse transfers run after the forward's record and land in the same entries
        assert all(r["timed"][c] > r["timed forward"][c] for c in COLLECTIVES), (rank, mode, r)


@pytest.mark.parametrize("mode", list(MODES))
def test_an_untimed_log_records_no_seconds(reports, mode):
    assert all(report[mode]["untimed seconds"] == {} for report in reports)


def test_the_modes_ran_the_path_they_name(reports):
    r = reports[0]
    assert r["all_to_all"]["mode"] == "all_to_all" and r["ring"]["mode"] == "ring"
    assert r["all_gather"]["mode"] == "all_gather" and not r["all_gather"]["fell back"]
    assert r["fallback"]["mode"] == "all_gather" and r["fallback"]["fell back"]


def stats(seconds):
    return ExchangeStats(mode="all_to_all", fell_back=False, exchange_bytes=10, halo_bytes=2, compressed_bytes=3,
                         allgather_bytes=40, blocks_fetched=1, seconds=seconds)


def test_exchange_totals_sums_seconds_over_layers_and_adds_none_when_untimed():
    timed = exchange_totals([stats({"halo": 0.25, "exchange": 1.0}), stats({"halo": 0.5, "compressed_allgather": 2.0})])
    assert timed["halo_s"] == 0.75 and timed["exchange_s"] == 1.0 and timed["compressed_allgather_s"] == 2.0
    assert timed["exchange_bytes"] == 20
    untimed = exchange_totals([stats({}), stats({})])
    assert not [k for k in untimed if k.endswith("_s")]


def test_untimed_stopwatches_are_the_shared_no_op_and_timed_ones_accumulate():
    seconds, watches = stopwatches(COLLECTIVES, torch.device("cpu"), timed=False)
    assert seconds == {} and all(w is UNTIMED for w in watches.values())
    seconds, watches = stopwatches(COLLECTIVES, torch.device("cpu"), timed=True)
    assert all(isinstance(w, Stopwatch) for w in watches.values())
    for _ in range(2):
        with watches["halo"]:
            sum(range(1000))
    assert set(seconds) == {"halo"} and seconds["halo"] > 0


def test_the_parallel_config_knob_is_off_by_default():
    assert ParallelConfig().time_collectives is False
    assert ParallelConfig(time_collectives=True).validate().time_collectives
