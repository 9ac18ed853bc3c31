"""bench/project.py and bench/exchange_fraction.py at tiny sizes on CPU, their bytes against counts made here."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # exchange_fraction imports project by this name
    spec.loader.exec_module(module)
    return module


# --tiny: 4 query heads, 1 KV head, head dim 16, conf/nsa/tiny's l=16, d=8, l'=32, n=4, w=64; fp32 on CPU
HEADS, KV_HEADS, HEAD_DIM, BLOCK_LEN, STRIDE, WINDOW, FP32 = 4, 1, 16, 16, 8, 64, 4
ROW_BYTES = KV_HEADS * 2 * HEAD_DIM * FP32  # K and V of one token


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    out = tmp_path_factory.mktemp("projection") / "projection.json"
    load_bench("project").main(["--tiny", "--device", "cpu", "--n", "512", "--p", "1,2,4", "--tokens-per-gpu", "128",
                                "--repeats", "1", "--warmup", "0", "--json", str(out)])
    return json.loads(out.read_text())["rows"]


def test_rows_cover_every_strong_and_weak_point(projection):
    got = {(r["scaling"], r["P"], r["N"]) for r in projection}
    assert got == {("strong", 1, 512), ("strong", 2, 512), ("strong", 4, 512),
                   ("weak", 1, 128), ("weak", 2, 256), ("weak", 4, 512)}
    for r in projection:
        assert r["card"] == "cpu" and r["torch"] and "bench/project.py" in r["command"]
        assert r["compute_s"] > 0 and math.isfinite(r["tokens_per_s"])


def test_one_rank_moves_nothing(projection):
    for r in (r for r in projection if r["P"] == 1):
        assert r["exchange_s"] == r["halo_s"] == r["compressed_allgather_s"] == r["comm_s"] == 0
        assert set(r["bytes_rank0"].values()) == {0}
        assert r["remote_blocks_per_rank"] == [0] and not r["fell_back"]
    strong_base = next(r for r in projection if r["scaling"] == "strong" and r["P"] == 1)
    assert strong_base["speedup"] == pytest.approx(1.0)


def _halo_tokens_sent_by_rank0(P: int, N: int) -> int:
    """Tokens before each chunk of every other rank, within the halo, that rank 0 owns: brute force."""
    C, halo = N // (2 * P), WINDOW - 1
    owner = [min(c, 2 * P - 1 - c) for c in range(2 * P)]
    sent = 0
    for rank in range(1, P):
        for chunk in (rank, 2 * P - 1 - rank):
            sent += sum(1 for t in range(max(0, chunk * C - halo), chunk * C) if owner[t // C] == 0)
    return sent


def _compressed_tokens_of_rank0(P: int, N: int) -> int:
    C = N // (2 * P)
    last_keys = range(BLOCK_LEN - 1, N, STRIDE)  # compressed token i's block ends at i*d + l - 1
    return sum(1 for t in last_keys if t // C in (0, 2 * P - 1))


@pytest.mark.parametrize("P", [2, 4])
def test_bytes_match_an_independent_count(projection, P):
    N = 512
    row = next(r for r in projection if r["scaling"] == "strong" and r["P"] == P)
    C = N // (2 * P)
    allgather = 2 * C * ROW_BYTES * (P - 1)
    assert row["allgather_bytes_per_rank"] == allgather
    assert row["bytes_rank0"]["allgather_bytes"] == allgather
    assert row["bytes_rank0"]["halo_bytes"] == _halo_tokens_sent_by_rank0(P, N) * ROW_BYTES
    assert row["bytes_rank0"]["compressed_bytes"] == _compressed_tokens_of_rank0(P, N) * (P - 1) * ROW_BYTES
    select_size = 32
    block_bytes = select_size * ROW_BYTES + 8
    max_received = max(row["remote_blocks_per_rank"]) * block_bytes
    assert row["max_received_exchange_bytes"] == max_received
    assert row["fell_back"] == (max_received >= allgather)
    # chunk r's queries see blocks of the r earlier chunks at most (plus chunk 2P-1-r's earlier ones)
    assert 0 < max(row["remote_blocks_per_rank"]) <= (2 * P - 2) * C // select_size


def test_fallback_rule_and_bandwidth_table():
    project = load_bench("project")
    C, P, row, l_sel = 64, 2, 16, 32
    allgather = 2 * C * row * (P - 1)
    few = project.exchange_bytes([{1: 1}, {0: 1}], P, C, row, l_sel)
    assert few.allgather_bytes == allgather and not few.fall_back
    assert few.received == [l_sel * row + 8] * 2
    every = project.exchange_bytes([{1: 4}, {}], P, C, row, l_sel)  # all of rank 1's blocks: ids tip it over
    assert every.fall_back
    net = project.Network(gpus_per_node=8, inter_node_gbps=400)
    assert net.all_to_all_gbps(8 * 2**20) == pytest.approx(102)
    assert net.all_to_all_gbps(2**30) == pytest.approx(336)
    assert net.all_to_all_gbps(math.sqrt(8 * 2**20 * 2**30)) == pytest.approx((102 + 336) / 2)
    assert net.all_gather_s(342e9, 2) == pytest.approx(0.5)
    assert net.all_gather_s(50e9, 16) == pytest.approx(50e9 * 15 / 16 / 50e9)  # the 400 Gbit/s link caps the ring


def test_exchange_fraction_on_a_random_tiny_model(tmp_path):
    out = tmp_path / "fraction.json"
    result = load_bench("exchange_fraction").main(["--n", "512", "--p", "1,2,4", "--json", str(out)])
    assert json.loads(out.read_text())["layers"] == result["layers"]
    ranks = result["ranks"]
    block_bytes = result["select_size"] * result["row_bytes"] + 8
    assert {(r["P"], r["rank"]) for r in ranks} == {(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)}
    for r in ranks:
        assert 0.0 <= r["remote_fraction"] <= 1.0
        assert r["fetch_bytes"] == r["remote_blocks"] * block_bytes
    for r in (r for r in ranks if r["P"] == 1):
        assert r["remote_fraction"] == 0 and r["remote_blocks"] == 0 and r["fetch_bytes"] == 0
    # every query past the first chunk selects block 0 (the initial block), which rank 0 owns
    assert all(r["remote_fraction"] > 0 for r in ranks if r["P"] > 1 and r["rank"] > 0)
    for s in result["layers"]:
        assert s["choice"] == "none (P = 1)" if s["P"] == 1 else s["choice"] in ("exchange", "all-gather")
