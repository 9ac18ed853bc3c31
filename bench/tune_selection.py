"""Selected attention's tile choices for the small-group model shapes, timed in one run on one GPU.

    python bench/tune_selection.py --shapes llama8b,llama1b,qwen7b --T 64k --routing trained,rand --out tune.json

Candidates are entries of the tuning table (kernels/nsa/tuning.py), each applied alone through
`tuning.override` with the others at the card's defaults:
  sel_groups  the forward / dQ tile of the shape's group: (query, head) rows -> queries per tile
              (rows = next_pow2(G): one query, its heads padded to 16 rows), warps, stages
  sel_own     the union share above which a tile runs query by query (0: always, 2: never)
  sel_dkdv    the dK/dV kernel's rows per step, warps, stages
Every candidate is compiled first, in parallel processes at a small length (the compiled variant does
not depend on T), then timed: selected attention fwd and fwd+bwd, median of `triton.testing.do_bench`,
on bench/routing.py's block ids. Prints a table, the fastest candidate of each entry per shape and
routing, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from kernels import PAPER, SHAPES, measure, parse_T, qkv
from routing import block_ids


def candidates(G: int, D: int) -> list[tuple[str, dict]]:
    """(label, tuning entries) per candidate; the first is the table as it stands."""
    from nsa_dist.kernels.nsa.tuning import SelTile
    gp = triton_p2(G)
    out = [("default", {})]
    for rows, warps, stages in ((gp, 1, 2), (gp, 2, 2), (gp, 4, 3), (16, 1, 2), (16, 2, 3), (16, 4, 2),
                                (16, 8, 3), (32, 4, 3), (32, 8, 3)):
        out.append((f"sel={rows},{warps},{stages}", dict(sel_groups=(((G, D), SelTile(rows, warps, stages)),))))
    out += [(f"sel_own={x}", dict(sel_own=x)) for x in (0.0, 0.5, 0.9, 2.0)]
    out += [(f"sel_dkdv={r},{w},{s}", dict(sel_dkdv=SelTile(r, w, s)))
            for r, w, s in ((16, 4, 2), (64, 4, 2), (64, 8, 2), (32, 4, 3), (32, 2, 2))]
    return out


def triton_p2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def selection_fn(shape, T, routing, device):
    from nsa_dist.kernels import selection_attention
    HQ, H, D = SHAPES[shape]
    leaves = qkv(T, HQ, H, D, device, seed=T + HQ + D)
    idx = block_ids(T, H, routing, n=PAPER["top_n"], sel=PAPER["select_size"], seed=T, device=device)
    return (lambda: selection_attention(*leaves, idx, select_size=PAPER["select_size"], backend="triton")), leaves


def compile_one(job):
    """Fill Triton's on-disk cache with one candidate's kernels (a child process)."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from nsa_dist.kernels.nsa import tuning
    shape, label, entries = job
    with tuning.override(**entries):
        fwd, _ = selection_fn(shape, 4096, "rand", "cuda")
        fwd().float().sum().backward()
    torch.cuda.synchronize()
    return shape, label


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama8b,llama1b,qwen7b")
    p.add_argument("--T", default="64k")
    p.add_argument("--routing", default="trained,rand")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    p.add_argument("--workers", type=int, default=14, help="parallel compile processes")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from nsa_dist.kernels.nsa import tuning
    t0 = time.time()
    shapes = [s for s in args.shapes.split(",") if s]
    jobs = [(s, label, entries) for s in shapes for label, entries in candidates(SHAPES[s][0] // SHAPES[s][1], SHAPES[s][2])]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for shape, label in pool.imap_unordered(compile_one, jobs):
            print(f"compiled {shape} {label} at {time.time() - t0:.0f}s", flush=True)
    results = []
    for T in parse_T(args.T):
        for shape in shapes:
            for routing in args.routing.split(","):
                fwd, leaves = selection_fn(shape, T, routing, "cuda")
                for _, label, entries in (j for j in jobs if j[0] == shape):
                    row = dict(shape=shape, T=T, routing=routing, candidate=label)
                    if time.time() - t0 > args.budget_s:
                        results.append(dict(row, note="skipped: time budget"))
                        continue
                    try:
                        with tuning.override(**entries):
                            row["fwd_ms"], row["fwdbwd_ms"] = measure(fwd, leaves, args)
                    except Exception as e:  # a tile that does not fit this card: record and go on
                        row["note"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    results.append(row)
                    print(f"{shape:<8}{T // 1024:>5}k {routing:<8}{label:<22}"
                          f"{row.get('fwd_ms', float('nan')):>9.2f}{row.get('fwdbwd_ms', float('nan')):>10.2f}  "
                          f"{row.get('note', '')}", flush=True)
                del fwd, leaves
                torch.cuda.empty_cache()
    best = {}  # per shape, length, routing and entry: the fastest of that entry's candidates and the default
    for r in results:
        if "fwdbwd_ms" not in r:
            continue
        entries = sorted({c.split("=")[0] for _, c, _ in jobs if c != "default"}) if r["candidate"] == "default" \
            else [r["candidate"].split("=")[0]]
        for entry in entries:
            key = f"{r['shape']}@{r['T'] // 1024}k:{r['routing']}:{entry}"
            if key not in best or r["fwdbwd_ms"] < best[key]["fwdbwd_ms"]:
                best[key] = dict(candidate=r["candidate"], fwdbwd_ms=r["fwdbwd_ms"])
    print("\nfastest per entry (fwd+bwd ms; 'default' is the table as it stands):")
    for key, b in sorted(best.items()):
        print(f"  {key:<40}{b['candidate']:<22}{b['fwdbwd_ms']:>9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results, best=best,
                           seconds=time.time() - t0), f, indent=1)


if __name__ == "__main__":
    main()
