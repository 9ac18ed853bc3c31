"""Sequence-parallel NSA layer: fwd+bwd step time and bytes moved, for N tokens over P ranks.

Measures, in one run on one machine, for every N and P:
  - P = 1: the plain layer on one GPU (the reference for speed-ups);
  - "exchange": the selected-block exchange (all_to_all, falling back to the all-gather when cheaper);
  - "ring": the same blocks moved in P-1 point-to-point steps (with --ring);
  - "all_gather": the plain context-parallel baseline (every rank gathers all K/V).
and prints a table (and writes JSON) with median step time, speed-up over P = 1, and the bytes
each variant sent in the forward (the backward sends the same again) next to what the plain
all-gather would have sent.

    torchrun --nproc_per_node 4 bench/sp.py --tokens 64k,256k,1M --sizes 1,2,4 --json bench/sp.json
    torchrun --nproc_per_node 2 bench/sp.py --device cpu --tokens 2k --sizes 1,2 --hidden 64 --heads 4 --kv-heads 2 \
        --head-dim 16 --window 64   # a smoke run on CPU (gloo, fp32)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from nsa_dist import NativeSparseAttention, parallelize
from nsa_dist.parallel import ExchangeLog, SequenceParallel


def parse_tokens(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        scale = {"k": 1024, "m": 1024 * 1024}.get(part[-1:], 1)
        out.append(int(part.rstrip("km")) * scale)
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="64k,256k,1M", help="global sequence lengths (k = 1024, M = 1024^2)")
    p.add_argument("--sizes", default="1,2,4", help="sequence-parallel sizes (each <= the number of processes)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-len", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--select-size", type=int, default=64)
    p.add_argument("--top-n", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--backend", default="auto", help="op backend: auto (triton on CUDA), triton or torch")
    p.add_argument("--ring", action="store_true", help="also time the ring-scheduled exchange")
    p.add_argument("--no-baseline", action="store_true", help="skip the all-gather baseline")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", default="bench/sp.json", help="write the results here (rank 0); \"\" to skip")
    return p.parse_args()


def setup(device: str):
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    dist.init_process_group("gloo")
    return torch.device("cpu"), torch.float32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(layer, x, device, warmup, iters, sp=None) -> float:
    """Median seconds of one forward + backward of `layer` on `x` (the slowest rank's, with `sp`, which the
    layer was parallelized over)."""
    times = []
    for i in range(warmup + iters):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        if sp is not None:
            dist.barrier(group=sp.group)
        sync(device)
        t0 = time.perf_counter()
        y = layer(x)
        y.backward(torch.ones_like(y))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    if sp is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=sp.group)
    return float(t)


def summed(values: list[int], sp, device) -> int:
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, group=sp.group)
    return t.tolist()


def main():
    args = parse_args()
    device, dtype = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [p for p in (int(s) for s in args.sizes.split(",")) if p <= world]
    groups = {p: dist.new_group(list(range(p))) for p in sizes if p > 1}  # every rank creates every group
    torch.manual_seed(0)
    layer = NativeSparseAttention(args.hidden, args.heads, args.kv_heads, args.head_dim, block_len=args.block_len,
                                  stride=args.stride, select_size=args.select_size, top_n=args.top_n,
                                  window=args.window, backend=args.backend).to(device=device, dtype=dtype)
    variants = ["exchange"] + (["ring"] if args.ring else []) + ([] if args.no_baseline else ["all_gather"])
    results = []
    if rank == 0:
        card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"# {card}, torch {torch.__version__}, {dtype}, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
              f"head_dim {args.head_dim}, l={args.block_len} d={args.stride} l'={args.select_size} n={args.top_n} "
              f"w={args.window}, backend {args.backend}")
        print(f"{'N':>8} {'P':>2} {'variant':>10} {'ms':>9} {'speedup':>8} {'sent MB':>9} {'all-gather MB':>14} "
              f"{'ratio':>6} {'halo MB':>8} {'cmp MB':>7} {'fell back':>9}")
    for n in parse_tokens(args.tokens):
        base_s = None
        for p in sizes:
            if p == 1:
                row = dict(N=n, P=1, variant="single")
                if rank == 0:
                    row.update(run_single(layer, n, args, device, dtype))
                    base_s = row.get("seconds")
                    report(row, base_s)
                    results.append(row)
                dist.barrier()
                continue
            for variant in variants:
                if rank >= p:
                    dist.barrier()
                    continue
                sp = SequenceParallel(group=groups[p], exchange={"exchange": "all_to_all"}.get(variant, variant),
                                      validate=False, check_inputs=False)
                row = dict(N=n, P=p, variant=variant)
                row.update(run_sharded(layer, n, sp, args, device, dtype))
                if rank == 0:
                    report(row, base_s)
                    results.append(row)
                dist.barrier()
    if rank == 0 and args.json:
        meta = dict(card=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                    dtype=str(dtype), world=world, args=vars(args))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print(f"wrote {args.json}")
    dist.destroy_process_group()


def run_single(layer, n, args, device, dtype) -> dict:
    try:
        x = torch.randn(1, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
        parallelize(layer, None)  # the whole sequence on this rank
        return dict(seconds=time_step(layer, x, device, args.warmup, args.iters))
    except torch.OutOfMemoryError:
        return dict(seconds=None, error="out of memory")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_sharded(layer, n, sp, args, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1000 + sp.rank)
    log = ExchangeLog()
    try:
        x = torch.randn(1, n // sp.size, args.hidden, device=device, dtype=dtype, generator=gen, requires_grad=True)
        parallelize(layer, sp, exchange_log=log)
        seconds = time_step(layer, x, device, args.warmup, args.iters, sp)
        oom = 0
    except torch.OutOfMemoryError:
        seconds, oom = None, 1
    except NotImplementedError as e:  # raised on every rank alike, before any exchange of the step
        return dict(seconds=None, error=f"not implemented: {str(e)[:80]}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if summed([oom], sp, device)[0]:
        return dict(seconds=None, error="out of memory")
    last = log.pop()[-1]
    sent, allgather, halo, cmp, fell = summed([last.exchange_bytes, last.allgather_bytes, last.halo_bytes,
                                               last.compressed_bytes, int(last.fell_back)], sp, device)
    return dict(seconds=seconds, mode=last.mode, exchange_bytes=sent, allgather_bytes=allgather, halo_bytes=halo,
                compressed_bytes=cmp, ranks_fell_back=fell)


def report(row, base_s):
    s = row.get("seconds")
    if s is None:
        print(f"{row['N']:>8} {row['P']:>2} {row['variant']:>10} {row.get('error', 'failed'):>9}")
        return
    row["speedup"] = base_s / s if base_s else None
    mb = lambda k: row[k] / 2 ** 20 if k in row else float("nan")  # noqa: E731
    ratio = row["exchange_bytes"] / row["allgather_bytes"] if row.get("allgather_bytes") else float("nan")
    speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
    print(f"{row['N']:>8} {row['P']:>2} {row['variant']:>10} {s * 1e3:>9.1f} {speed:>8} {mb('exchange_bytes'):>9.1f} "
          f"{mb('allgather_bytes'):>14.1f} {ratio:>6.2f} {mb('halo_bytes'):>8.1f} {mb('compressed_bytes'):>7.2f} "
          f"{row.get('ranks_fell_back', '-'):>9}", flush=True)


if __name__ == "__main__":
    main()
