"""Projected sequence-parallel scaling of the NSA layer, past the GPUs at hand, from one device.

For each (P, N) it builds the local work of ONE rank of a zigzag split at its real shard sizes —
query chunks r and 2P-1-r (N/(2P) tokens each), the compressed K/V of the whole sequence (what the
all-gather brings), the halo before each chunk, a K/V buffer for the blocks its queries select —
and times the forward and backward of the layer's attention ops (nsa_dist.kernels: compressed
attention, top-n selection, selected and sliding-window attention, gated sum) for the busiest rank
(the one with the most attention FLOPs). Inputs are random, so the top-n is close to uniform over
the past; bench/exchange_fraction.py measures selections of a trained model.

Each collective is modelled from the bytes it would move and a bandwidth table (NCCL bus bandwidth
on 4 H200 of one host: all-to-all 102 GB/s at 8 MiB per rank to 336 GB/s at 1 GiB, log-linear in
between and clamped outside; all-gather 342 GB/s; one ring step 360 GB/s; across nodes the
`--inter-node-gbps` link per GPU caps every transfer that leaves the node). The selected blocks move
by the exchange unless the busiest receiver would get at least the all-gather's bytes, then by the
all-gather (the library's fallback rule). The backward moves the same bytes back, so each
collective counts twice. Communication does not overlap compute unless `--overlap` (then a step
takes the longer of the two: a bound, not a schedule). Not modelled: the projections, φ and the
MLP around the attention, latency of small messages, the counts/ids handshake's round trip,
contention between concurrent jobs.

    python bench/project.py --json bench/results/projection_H200.json          # H200, paper config
    python bench/project.py --tiny --json /tmp/projection.json                 # seconds on CPU
    python bench/project.py --from-run outputs/RUN --n 256 --p 1,2 --json p.json  # a run's model dims
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nsa_dist.kernels import (compressed_attention, gated_sum, num_compressed, select_blocks, selection_attention,
                              window_attention)
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.parallel.exchange import ID_BYTES, all_gather_bytes
from nsa_dist.parallel.halo import halo_starts
from nsa_dist.parallel.sharding import chunk_owner, rank_chunks

NSA_KNOBS = ("block_len", "stride", "select_size", "top_n", "window", "num_init", "num_local")
GB = 1e9
MIB = 2**20
A2A_SMALL, A2A_LARGE = (8 * MIB, 102.0), (2**30, 336.0)  # (bytes per rank, bus GB/s)
ALLGATHER_GBPS = 342.0
RING_STEP_GBPS = 360.0

FULL_DEFAULTS = dict(heads=64, kv_heads=4, head_dim=128, n="256k,1M,4M", p="1,2,4,8,16,32,64", tokens_per_gpu="64k")
# conf/nsa/tiny's knobs: the torch reference runs these in seconds on CPU
TINY_DEFAULTS = dict(heads=4, kv_heads=1, head_dim=16, n="2k", p="1,2,4", tokens_per_gpu="512", block_len=16, stride=8,
                     select_size=32, top_n=4, window=64)


def parse_sizes(text: str) -> list[int]:
    """'256k,1M,4M' -> [262144, 1048576, 4194304] (k = 1024, M = 1024^2)."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        scale = {"k": 1024, "m": 2**20}.get(part[-1:].lower(), 1)
        sizes.append(int(part.rstrip("kKmM")) * scale)
    return sizes


@dataclass(frozen=True)
class Shape:
    """Layer shape, the NSA knobs (the library's own NSAConfig), batch (B = 1 unless given) and layers."""

    heads: int
    kv_heads: int
    head_dim: int
    nsa: NSAConfig = NSAConfig()
    batch: int = 1
    layers: int = 1

    @property
    def halo_len(self) -> int:
        return max(self.nsa.block_len - self.nsa.stride, self.nsa.window - 1 if self.nsa.window else 0)


def split_problem(shape: Shape, P: int, N: int) -> str | None:
    """Why N tokens do not split over P ranks the way the layer needs, or None."""
    if N % (2 * P):
        return f"N={N} does not split into 2P={2 * P} chunks"
    C = N // (2 * P)
    if C % shape.nsa.select_size or C % shape.nsa.stride:
        return f"chunks of {C} tokens are not whole selection blocks ({shape.nsa.select_size}) and strides"
    return None


def attention_work_per_rank(shape: Shape, P: int, N: int) -> np.ndarray:
    """Forward attention FLOPs of each rank's queries (the count nsa_dist.training.metrics uses), `[P]`."""
    t = np.arange(N, dtype=np.int64)
    c = shape.nsa
    visible_cmp = np.maximum(0, (t + 1 - c.block_len) // c.stride + 1)
    selected = np.minimum(c.top_n * c.select_size, t + 1)
    window = np.minimum(c.window, t + 1) if c.window else 0
    per_query = 6 * visible_cmp + 4 * selected + 4 * window
    per_chunk = per_query.reshape(2 * P, -1).sum(1)
    return np.array([per_chunk[a] + per_chunk[b] for a, b in (rank_chunks(r, P) for r in range(P))])


def compressed_tokens_per_chunk(shape: Shape, P: int, N: int) -> list[int]:
    """Compressed tokens computed by each chunk: those whose block's last key lies in it."""
    C = N // (2 * P)
    c = shape.nsa
    last = np.arange(num_compressed(N, c.block_len, c.stride)) * c.stride + c.block_len - 1
    return np.bincount(last // C, minlength=2 * P).tolist()


def halo_sources(shape: Shape, rank: int, P: int, N: int) -> dict[int, int]:
    """Tokens the rank's halo takes from each other rank (no packed documents)."""
    C = N // (2 * P)
    got: dict[int, int] = {}
    for c in rank_chunks(rank, P):
        lo = max(0, c * C - shape.halo_len)
        for g_chunk in range(lo // C, c):
            n = min((g_chunk + 1) * C, c * C) - max(g_chunk * C, lo)
            owner = g_chunk if g_chunk < P else 2 * P - 1 - g_chunk
            if owner != rank and n > 0:
                got[owner] = got.get(owner, 0) + n
    return got


def remote_blocks(idx_per_chunk: list[torch.Tensor], rank: int, P: int, chunk_len: int,
                  select_size: int) -> dict[int, int]:
    """Distinct remote selection blocks the rank's queries chose, counted per owner rank.

    `idx_per_chunk`: `[B, C, H, n]` global block ids per local chunk (-1 empty). Chunk edges are
    whole blocks, so a block has one owner; the union runs over batch, heads and queries, as the
    exchange fetches each block once with all its heads.
    """
    ids = torch.cat([i.flatten() for i in idx_per_chunk])
    blocks = torch.unique(ids[ids >= 0]).long()
    owners = chunk_owner(blocks * select_size // chunk_len, P)
    counts = torch.bincount(owners, minlength=P).tolist()
    return {s: counts[s] for s in range(P) if s != rank and counts[s]}


@dataclass(frozen=True)
class ExchangeBytes:
    """The selected-block exchange of one layer call against the all-gather, for every rank."""

    received: list[int]  # bytes each rank would receive by the exchange (blocks and their ids)
    sent: list[int]  # bytes each rank would send by the exchange (counts, ids, blocks)
    allgather_bytes: int  # what each rank sends (and receives) in the all-gather of all K/V
    fall_back: bool  # the library's rule: the busiest receiver gets >= the all-gather's bytes


def exchange_bytes(wanted: list[dict[int, int]], P: int, chunk_len: int, row_bytes: int,
                   select_size: int) -> ExchangeBytes:
    """`wanted[d][s]`: blocks rank d fetches from rank s. Same byte rule as parallel/exchange.py."""
    block_bytes = select_size * row_bytes
    allgather = all_gather_bytes(2 * chunk_len, row_bytes, P)
    counts_bytes = ID_BYTES * P * (P - 1)
    received = [sum(w.values()) * (block_bytes + ID_BYTES) for w in wanted]
    sent = [counts_bytes + ID_BYTES * sum(wanted[r].values()) + block_bytes * sum(w.get(r, 0) for w in wanted)
            for r in range(P)]
    return ExchangeBytes(received=received, sent=sent, allgather_bytes=allgather,
                         fall_back=P > 1 and max(received) >= allgather)


@dataclass(frozen=True)
class Network:
    gpus_per_node: int
    inter_node_gbps: float  # Gbit/s per GPU across nodes

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def inter_gbytes(self) -> float:
        return self.inter_node_gbps / 8

    def all_to_all_gbps(self, bytes_per_rank: float) -> float:
        (s0, b0), (s1, b1) = A2A_SMALL, A2A_LARGE
        x = min(1.0, max(0.0, math.log(max(bytes_per_rank, 1) / s0) / math.log(s1 / s0)))
        return b0 + x * (b1 - b0)

    def all_gather_s(self, total_bytes: float, P: int) -> float:
        """Ring all-gather of `total_bytes` in all: bus bytes over the slowest link of the ring."""
        if P == 1:
            return 0.0
        bw = ALLGATHER_GBPS if P <= self.gpus_per_node else min(ALLGATHER_GBPS, self.inter_gbytes)
        return total_bytes * (P - 1) / P / (bw * GB)

    def all_to_all_s(self, per_peer: list[dict[int, int]]) -> float:
        """`per_peer[r][s]`: bytes between ranks r and s (either way; the busier direction counts).
        Intra-node and inter-node traffic move concurrently; the slower finishes the step."""
        worst = 0.0
        for r, peers in enumerate(per_peer):
            intra = sum(b for s, b in peers.items() if self.node(s) == self.node(r))
            inter = sum(b for s, b in peers.items() if self.node(s) != self.node(r))
            total = intra + inter
            if not total:
                continue
            bus = self.all_to_all_gbps(total * len(per_peer) / max(1, len(per_peer) - 1))
            worst = max(worst, intra / (bus * GB), inter / (self.inter_gbytes * GB) if inter else 0.0)
        return worst

    def point_to_point_s(self, per_peer: list[dict[int, int]]) -> float:
        worst = 0.0
        for r, peers in enumerate(per_peer):
            t = sum(b / ((RING_STEP_GBPS if self.node(s) == self.node(r) else self.inter_gbytes) * GB)
                    for s, b in peers.items())
            worst = max(worst, t)
        return worst


def busiest_direction(sent_to: list[dict[int, int]]) -> list[dict[int, int]]:
    """Per rank and peer, the larger of what it sends there and what it receives from there."""
    P = len(sent_to)
    return [{s: max(sent_to[r].get(s, 0), sent_to[s].get(r, 0)) for s in range(P)
             if s != r and (sent_to[r].get(s, 0) or sent_to[s].get(r, 0))} for r in range(P)]


class RankInputs:
    """Random tensors of one rank's local attention work, seeded by (seed, P, N, rank) and drawn on the
    device (a CPU draw of a million-token K/V buffer takes longer than the kernels). Only the queries
    exist until `add_attention_inputs`: every rank's selection is needed, one rank's timing."""

    def __init__(self, shape: Shape, P: int, N: int, rank: int, k_cmp, v_cmp, *, dtype, device, seed: int):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.C = N // (2 * P)
        self.gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + P * 10_007 + N + rank) % 2**31)
        self.starts = [c * self.C for c in rank_chunks(rank, P)]
        self.q = [self.randn(shape.batch, self.C, shape.heads, shape.head_dim) for _ in self.starts]
        self.k_cmp, self.v_cmp = k_cmp, v_cmp
        self.halo_starts = halo_starts(rank, P, self.C, shape.halo_len)

    def randn(self, *dims):
        return torch.randn(*dims, generator=self.gen, device=self.device, dtype=self.dtype)

    def add_attention_inputs(self) -> "RankInputs":
        s, C = self.shape, self.C
        self.k_win = [self.randn(s.batch, st + C - lo, s.kv_heads, s.head_dim)
                      for st, lo in zip(self.starts, self.halo_starts)]
        self.v_win = [self.randn(*k.shape) for k in self.k_win]
        buffer_len = self.starts[1] + C  # global tokens [0, end of the rank's last chunk)
        self.k_buf = self.randn(s.batch, buffer_len, s.kv_heads, s.head_dim)
        self.v_buf = self.randn(s.batch, buffer_len, s.kv_heads, s.head_dim)
        self.gates = [[torch.sigmoid(self.randn(s.batch, C, s.heads)) for _ in range(3)] for _ in self.starts]
        self.grads = [self.randn(s.batch, C, s.heads, s.head_dim) for _ in self.starts]
        return self

    def leaves(self):
        return [*self.q, self.k_cmp, self.v_cmp, *self.k_win, *self.v_win, self.k_buf, self.v_buf,
                *(g for gs in self.gates for g in gs)]


def selections(shape: Shape, x: RankInputs, N: int, backend: str) -> list[torch.Tensor]:
    c = shape.nsa
    with torch.no_grad():
        out = []
        for q, start in zip(x.q, x.starts):
            _, lse = compressed_attention(q, x.k_cmp, x.v_cmp, block_len=c.block_len, stride=c.stride,
                                          q_offset=start, backend=backend)
            out.append(select_blocks(q, x.k_cmp, lse, block_len=c.block_len, stride=c.stride,
                                     select_size=c.select_size, top_n=c.top_n, num_init=c.num_init,
                                     num_local=c.num_local, q_offset=start, backend=backend))
        return out


def rank_forward_backward(shape: Shape, x: RankInputs, N: int, backend: str) -> None:
    c = shape.nsa
    pos = dict(backend=backend)
    loss = 0
    for j, (q, start) in enumerate(zip(x.q, x.starts)):
        o_cmp, lse = compressed_attention(q, x.k_cmp, x.v_cmp, block_len=c.block_len, stride=c.stride,
                                          q_offset=start, **pos)
        idx = select_blocks(q, x.k_cmp, lse, block_len=c.block_len, stride=c.stride, select_size=c.select_size,
                            top_n=c.top_n, num_init=c.num_init, num_local=c.num_local, q_offset=start, **pos)
        branches = [o_cmp, selection_attention(q, x.k_buf, x.v_buf, idx, select_size=c.select_size, q_offset=start,
                                               k_offset=0, **pos)]
        if c.window:
            branches.append(window_attention(q, x.k_win[j], x.v_win[j], window=c.window, q_offset=start,
                                             k_offset=x.halo_starts[j], **pos))
        o = gated_sum(branches, x.gates[j][:len(branches)], backend=backend)
        loss = loss + (o.float() * x.grads[j].float()).sum()
    loss.backward()


def time_rank(shape: Shape, x: RankInputs, N: int, backend: str, *, repeats: int, warmup: int, device) -> float:
    """Median seconds of one forward + backward of the rank's attention work."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in x.leaves():
        t.requires_grad_(True)
    times = []
    for i in range(warmup + repeats):
        for t in x.leaves():
            t.grad = None
        sync()
        start = time.perf_counter()
        rank_forward_backward(shape, x, N, backend)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    for t in x.leaves():
        t.requires_grad_(False)
        t.grad = None
    return statistics.median(times)


def project_row(shape: Shape, P: int, N: int, net: Network, *, dtype, device, backend: str, repeats: int,
                warmup: int, overlap: bool, seed: int) -> dict:
    s = shape
    C = N // (2 * P)
    elt = torch.empty((), dtype=dtype).element_size()
    row_bytes = s.batch * s.kv_heads * 2 * s.head_dim * elt  # K and V of one token, all heads
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Tc = num_compressed(N, s.nsa.block_len, s.nsa.stride)
    k_cmp = torch.randn(s.batch, Tc, s.kv_heads, s.head_dim, generator=gen).to(device=device, dtype=dtype)
    v_cmp = torch.randn(s.batch, Tc, s.kv_heads, s.head_dim, generator=gen).to(device=device, dtype=dtype)
    work = attention_work_per_rank(s, P, N)
    busiest = int(work.argmax())

    wanted, timed = [], None
    for r in range(P):
        x = RankInputs(s, P, N, r, k_cmp, v_cmp, dtype=dtype, device=device, seed=seed)
        wanted.append(remote_blocks(selections(s, x, N, backend), r, P, C, s.nsa.select_size) if P > 1 else {})
        if r == busiest:
            timed = x.add_attention_inputs()
        else:
            del x
    compute_s = time_rank(s, timed, N, backend, repeats=repeats, warmup=warmup, device=device)
    del timed

    xb = exchange_bytes(wanted, P, C, row_bytes, s.nsa.select_size)
    block_bytes = s.nsa.select_size * row_bytes + ID_BYTES
    sent_to = [{d: wanted[d].get(r, 0) * block_bytes for d in range(P) if d != r and wanted[d].get(r, 0)}
               for r in range(P)]
    halo_from = [halo_sources(s, r, P, N) for r in range(P)]
    halo_sent_to = [{d: halo_from[d][r] * row_bytes for d in range(P) if r in halo_from[d]} for r in range(P)]
    cmp_counts = compressed_tokens_per_chunk(s, P, N)
    cmp_row_bytes = row_bytes  # compressed K and V rows have the shape of K/V rows
    cmp_per_rank = [sum(cmp_counts[c] for c in rank_chunks(r, P)) for r in range(P)]

    allgather_s = net.all_gather_s(N * row_bytes, P)
    selected_s = allgather_s if xb.fall_back else net.all_to_all_s(busiest_direction(sent_to))
    compressed_s = net.all_gather_s(Tc * cmp_row_bytes, P)
    halo_s = net.point_to_point_s(busiest_direction(halo_sent_to))
    # the backward returns every gradient by the reverse of each transfer: the same bytes again
    per_layer = {"compute_s": compute_s, "exchange_s": 2 * selected_s, "compressed_allgather_s": 2 * compressed_s,
                 "halo_s": 2 * halo_s, "allgather_baseline_s": 2 * allgather_s}
    times = {k: v * s.layers for k, v in per_layer.items()}
    comm_s = times["exchange_s"] + times["compressed_allgather_s"] + times["halo_s"]
    step_s = max(times["compute_s"], comm_s) if overlap else times["compute_s"] + comm_s
    rank0 = {"exchange_bytes": s.layers * (ID_BYTES * P * (P - 1) + xb.allgather_bytes if xb.fall_back
                                           else xb.sent[0]) if P > 1 else 0,
             "halo_bytes": s.layers * sum(halo_sent_to[0].values()),
             "compressed_bytes": s.layers * cmp_per_rank[0] * (P - 1) * cmp_row_bytes,
             "allgather_bytes": s.layers * xb.allgather_bytes}
    tokens = s.batch * N
    return {
        "P": P, "N": N, "tokens_per_gpu": N // P, "timed_rank": busiest,
        "work_imbalance": round(float(work.max() / work.mean()), 4),
        **{k: round(v, 6) for k, v in times.items()}, "comm_s": round(comm_s, 6), "step_s": round(step_s, 6),
        "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / P,
        "fell_back": xb.fall_back,
        "max_received_exchange_bytes": max(xb.received), "allgather_bytes_per_rank": xb.allgather_bytes,
        "remote_blocks_per_rank": [sum(w.values()) for w in wanted],
        "bytes_rank0": rank0,
    }


def add_speedups(rows: list[dict]) -> None:
    """Strong scaling: speed-up of each row over the P = 1 row of the same N; weak: tokens/s per GPU
    relative to P = 1 of the same tokens per GPU."""
    for row in rows:
        key = "N" if row["scaling"] == "strong" else "tokens_per_gpu"
        base = next((b for b in rows if b["scaling"] == row["scaling"] and b[key] == row[key] and b["P"] == 1), None)
        if base is None:
            continue
        if row["scaling"] == "strong":
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["efficiency"] = row["speedup"] / row["P"]
        else:
            row["efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]


def shape_from_run(run_dir: Path) -> dict:
    """Model dims and NSA knobs of a training run, from its `.hydra/config.yaml`."""
    from omegaconf import OmegaConf

    import nsa_dist.config  # noqa: F401 - registers ${mul:...}, which a weak-scaling data.seq_len is written with

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    model, nsa = cfg["model"], cfg["nsa"]
    return dict(heads=model["num_heads"], kv_heads=model["num_kv_heads"], head_dim=model["head_dim"],
                layers=model["num_layers"], batch=cfg["trainer"]["batch_size"],
                **{k: nsa[k] for k in NSA_KNOBS})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized defaults: " + str(TINY_DEFAULTS))
    p.add_argument("--from-run", type=Path, help="take model dims, NSA knobs, layers and batch from a run dir")
    p.add_argument("--n", help="global lengths for strong scaling (k = 1024, M = 1024^2)")
    p.add_argument("--p", help="sequence-parallel sizes")
    p.add_argument("--tokens-per-gpu", help="tokens per GPU for weak scaling (N = this x P)")
    p.add_argument("--scaling", default="strong,weak", help="strong, weak or both")
    for name in ("heads", "kv_heads", "head_dim", *NSA_KNOBS, "batch", "layers"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--inter-node-gbps", type=float, default=400.0, help="Gbit/s per GPU between nodes")
    p.add_argument("--overlap", action="store_true", help="a step takes max(compute, comm), not their sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the rows here")
    return p.parse_args(argv)


def resolve(args) -> tuple[Shape, dict]:
    defaults = dict(TINY_DEFAULTS if args.tiny else FULL_DEFAULTS)
    if args.from_run:
        defaults.update(shape_from_run(args.from_run))
    for name in ("n", "p", "tokens_per_gpu"):
        defaults[name] = getattr(args, name) or defaults[name]
    given = {**defaults, **{k: v for k, v in vars(args).items() if v is not None}}
    nsa = NSAConfig(**{k: given[k] for k in NSA_KNOBS if k in given}).validate()
    return Shape(nsa=nsa, **{k: given[k] for k in ("heads", "kv_heads", "head_dim", "batch", "layers")
                             if k in given}), defaults


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version}


def print_table(rows: list[dict]) -> None:
    head = (f"{'scaling':>7} {'P':>3} {'N':>9} {'compute ms':>11} {'exchange ms':>12} {'cmp-ag ms':>10} "
            f"{'halo ms':>8} {'ag-base ms':>11} {'tok/s/GPU':>11} {'speedup':>8} {'eff':>6} fallback")
    print(head)
    for r in rows:
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else "—"
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "—"
        print(f"{r['scaling']:>7} {r['P']:>3} {r['N']:>9} {1e3 * r['compute_s']:>11.2f} {1e3 * r['exchange_s']:>12.3f} "
              f"{1e3 * r['compressed_allgather_s']:>10.3f} {1e3 * r['halo_s']:>8.3f} "
              f"{1e3 * r['allgather_baseline_s']:>11.3f} {r['tokens_per_s_per_gpu']:>11.0f} {speedup:>8} {eff:>6} "
              f"{'all-gather' if r['fell_back'] else 'exchange'}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    shape, sizes = resolve(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    net = Network(gpus_per_node=args.gpus_per_node, inter_node_gbps=args.inter_node_gbps)
    Ps = parse_sizes(sizes["p"])
    plans = []
    if "strong" in args.scaling:
        plans += [("strong", P, N) for N in parse_sizes(sizes["n"]) for P in Ps]
    if "weak" in args.scaling:
        plans += [("weak", P, t * P) for t in parse_sizes(sizes["tokens_per_gpu"]) for P in Ps]
    env = environment(device)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        "python bench/project.py " + " ".join(shlex.quote(a) for a in argv)
    rows, measured = [], {}
    for scaling, P, N in plans:
        problem = split_problem(shape, P, N)
        if problem:
            print(f"skip {scaling} P={P} N={N}: {problem}", file=sys.stderr)
            continue
        if (P, N) not in measured:
            try:
                measured[(P, N)] = project_row(shape, P, N, net, dtype=dtype, device=device, backend=args.backend,
                                               repeats=args.repeats, warmup=args.warmup, overlap=args.overlap,
                                               seed=args.seed)
            except torch.cuda.OutOfMemoryError:
                # one rank's shard does not fit this card: no number rather than a guessed one
                measured[(P, N)] = None
                torch.cuda.empty_cache()
        if measured[(P, N)] is None:
            print(f"skip {scaling} P={P} N={N}: one rank's work does not fit in this device's memory",
                  file=sys.stderr)
            continue
        rows.append({"scaling": scaling, **measured[(P, N)], **env, "dtype": str(dtype).removeprefix("torch."),
                     "overlap": args.overlap, "gpus_per_node": net.gpus_per_node,
                     "inter_node_gbps": net.inter_node_gbps, "shape": asdict(shape), "command": command})
    add_speedups(rows)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"kind": "projection", "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
