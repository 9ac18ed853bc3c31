"""NSA kernel benchmark on one GPU: nsa_dist (Triton) vs torch SDPA (cuDNN, flash) vs fla-core's NSA.

    python bench/kernels.py --out kernels.json                 # everything, T = 8k..128k
    python bench/kernels.py --T 8k,64k --rows paper,cudnn      # a partial run
    python bench/kernels.py --rows "" --shapes llama8b,qwen7b --shape-T 64k --routing rand,trained --peers .peers

Rows (B = 1, D = 128, bf16, causal; median ms of `triton.testing.do_bench`, fwd and fwd+bwd):
  paper      nsa_dist, the paper's NSA: l=32, d=16, l'=64, n=16, w=512, HQ=64, H=4
  cudnn      torch SDPA, cuDNN backend, K/V expanded to HQ heads outside the timed region
  flash      torch SDPA, flash backend, likewise
  fla        fla-core parallel_nsa: mean pooling, block 64, n=16, no window (needs G >= 16)
  nsa_fla    nsa_dist in fla's configuration: l = d = l' = 64, n=16, window 0
  paper_g4 / cudnn_g4   HQ=16, H=4 (G=4);   paper_g1 / cudnn_g1   HQ=4, H=4 (G=1)
  parts      nsa_dist's ops one at a time in the paper configuration (where the time goes)
  --shapes   model shapes (heads / KV heads, head dim; paper's l, d, l', n, w), each at --shape-T (paper
             also at --paper-extra-T): `core:<shape>` nsa_dist's NSA core against `cudnn:<shape>`, and
             `sel:<shape>:<routing>` selected attention alone at --sel-T on the block ids of each
             --routing (bench/routing.py: rand, blk, trained)
             llama1b 32/8 d64, llama8b 32/8 d128, qwen7b 28/4 d128, paper 64/4 d128
  --peers DIR  the same rows for mdy666's flash_nsa and FSA staged in DIR (bench/peer_rows.py):
             `mdy666:<shape>`, `mdy666:sel:<shape>:<routing>`, likewise `fsa:...`, with the same inputs
  --profile  GPU time per kernel of the paper layer's fwd+bwd (torch.profiler), per iteration
  --tune     each entry of the kernels' tuning table (kernels/nsa/tuning.py) at its candidates in
             turn, the others at their defaults, through `tuning.override` (no environment variables)
nsa_dist's compression is mean pooling of the K/V blocks *inside* the timed region (a strided
view and a mean: memory-bound and small next to attention), so its gradient reaches k and v.
Anything that fails (out of memory, a missing package) is recorded as "skipped: reason".
"""
from __future__ import annotations

import argparse
import json
import time

import torch

ROWS = ("paper", "cudnn", "flash", "fla", "nsa_fla", "paper_g4", "cudnn_g4", "paper_g1", "cudnn_g1", "parts")
PAPER = dict(block_len=32, stride=16, select_size=64, top_n=16, window=512)
FLA = dict(block_len=64, stride=64, select_size=64, top_n=16, window=0)
HEADS = {"": (64, 4), "_g4": (16, 4), "_g1": (4, 4)}
SHAPES = {"llama1b": (32, 8, 64), "llama8b": (32, 8, 128), "qwen7b": (28, 4, 128), "paper": (64, 4, 128)}
PEERS = ("mdy666", "fsa")


def parse_T(s: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in s.split(",") if x]


def mean_pool(x, block_len, stride):
    """[B, T, H, D] -> [B, Tc, H, D]: the mean of each compression block."""
    return x.unfold(1, block_len, stride).mean(-1)


def timed(fn, leaves, warmup, rep):
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")


def qkv(T, HQ, H, D, device, seed):
    """bf16 leaves q `[1, T, HQ, D]`, k, v `[1, T, H, D]`, the same for every implementation of a row group."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, T, heads, D, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
            for heads in (HQ, H, H)]


def nsa_case(T, HQ, H, cfg, device, D=128, leaves=None):
    from nsa_dist.kernels import nsa_attention
    q, k, v = leaves or qkv(T, HQ, H, D, device, seed=T)
    gates = [torch.rand(1, T, HQ, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    leaves = [q, k, v] + gates
    l, d = cfg["block_len"], cfg["stride"]

    def fwd():
        k_cmp, v_cmp = mean_pool(k, l, d), mean_pool(v, l, d)
        return nsa_attention(q, k, v, k_cmp, v_cmp, gates[0], gates[1], gates[2] if cfg["window"] else None,
                             block_len=l, stride=d, select_size=cfg["select_size"], top_n=cfg["top_n"],
                             window=cfg["window"], backend="triton")
    return fwd, leaves


def sdpa_case(T, HQ, H, backend, device, D=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, HQ, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, H, T, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, H, T, D, device=device, dtype=torch.bfloat16)
    k = k.repeat_interleave(HQ // H, 1).requires_grad_()  # (1, HQ, T, D)
    v = v.repeat_interleave(HQ // H, 1).requires_grad_()
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fwd():
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fwd, [q, k, v]


def fla_case(T, device):
    from fla.ops.nsa import parallel_nsa
    HQ, H, D = 64, 4, 128
    q = torch.randn(1, T, HQ, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    g_cmp = torch.rand(1, T, HQ, device=device, dtype=torch.bfloat16, requires_grad=True)
    g_slc = torch.rand(1, T, HQ, device=device, dtype=torch.bfloat16, requires_grad=True)

    def fwd():
        return parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=16, block_size=64, window_size=0)
    return fwd, [q, k, v, g_cmp, g_slc]


def parts_cases(T, device):
    """The paper configuration op by op, with fixed compressed K/V and indices."""
    from nsa_dist.kernels import compressed_attention, select_blocks, selection_attention, window_attention
    HQ, H, D = 64, 4, 128
    l, d, sel, n, w = (PAPER[x] for x in ("block_len", "stride", "select_size", "top_n", "window"))
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(1, T, HQ, D), mk(1, T, H, D), mk(1, T, H, D)
    Tc = (T - l) // d + 1
    kc, vc = mk(1, Tc, H, D), mk(1, Tc, H, D)
    with torch.no_grad():
        _, lse = compressed_attention(q, kc, vc, block_len=l, stride=d, backend="triton")
        idx = select_blocks(q, kc, lse, block_len=l, stride=d, select_size=sel, top_n=n, backend="triton")
    return {
        "compressed": (lambda: compressed_attention(q, kc, vc, block_len=l, stride=d, backend="triton")[0],
                       [q, kc, vc]),
        "select": (lambda: select_blocks(q, kc, lse, block_len=l, stride=d, select_size=sel, top_n=n,
                                         backend="triton"), None),
        "selection": (lambda: selection_attention(q, k, v, idx, select_size=sel, backend="triton"), [q, k, v]),
        "window": (lambda: window_attention(q, k, v, window=w, backend="triton"), [q, k, v]),
    }


def tune_candidates():
    """Entry of kernels/nsa/tuning.py -> (the parts it affects, candidates; the first is sm_90's default).
    The paper configuration has D = 128 and l' > d, so the `_wide` and `select_r1` entries never run."""
    from nsa_dist.kernels.nsa.tuning import DenseTile, ScoreTile, SelTile, TopNTile
    dense = ("compressed", "window")
    return {
        "dense_dkdv": (dense, [DenseTile(64, 64, 4, 2), DenseTile(64, 64, 4, 3), DenseTile(64, 32, 4, 2),
                               DenseTile(64, 128, 8, 2), DenseTile(64, 64, 8, 2),
                               DenseTile(32, 128, 8, 2, rows_major=False)]),
        "dense_dq": (dense, [DenseTile(64, 64, 4, 2), DenseTile(64, 64, 4, 3), DenseTile(64, 128, 4, 2),
                             DenseTile(128, 64, 8, 2)]),
        "dense_fwd": (dense, [DenseTile(128, 64, 8, 3), DenseTile(64, 64, 4, 2), DenseTile(64, 64, 4, 3),
                              DenseTile(64, 128, 4, 2), DenseTile(128, 128, 8, 2)]),
        "select": (("select",), [ScoreTile(64, 64, 4, 2), ScoreTile(64, 64, 4, 3), ScoreTile(128, 64, 8, 2),
                                 ScoreTile(128, 64, 4, 2)]),
        "topn": (("select",), [TopNTile(1024, 4), TopNTile(2048, 4), TopNTile(4096, 4), TopNTile(512, 4)]),
        "sel": (("selection",), [SelTile(16, 4, 3), SelTile(16, 4, 2)]),
        "sel_dkdv": (("selection",), [SelTile(32, 4, 2), SelTile(16, 4, 2), SelTile(64, 8, 2), SelTile(32, 4, 3)]),
    }


def tune(T, args, device):
    """Each entry's candidates in turn (others at default), timed on the ops they affect."""
    from nsa_dist.kernels.nsa import tuning
    out = []
    parts = parts_cases(T, device)
    wanted = {x.strip().lower() for x in args.tune_knobs.split(",")} if args.tune_knobs else None
    for entry, (ops, values) in tune_candidates().items():
        if wanted and entry not in wanted:
            continue
        for value in values:
            label = ",".join({True: "rows", False: "keys"}.get(x, str(x)) if isinstance(x, bool) else str(x)
                             for x in value)
            for op in ops:
                f, lv = parts[op]
                row = f"tune:{entry}={label}:{op}"
                try:
                    with tuning.override(**{entry: value}):
                        t_f, t_fb = measure(f, lv, args)
                    out.append(dict(row=row, T=T, fwd_ms=t_f, fwdbwd_ms=t_fb))
                except Exception as e:
                    out.append(dict(row=row, T=T, note=f"skipped: {type(e).__name__}: {str(e)[:100]}"))
                print(table(out[-1:]).splitlines()[-1], flush=True)
    return out


def profile_kernels(T, args, device, iters=5):
    """GPU time per kernel (ms per fwd+bwd of the paper layer), from torch.profiler's CUDA events:
    which kernel of which op takes the time. Rows `profile:<kernel>`, largest first."""
    from torch.profiler import ProfilerActivity, profile
    fwd, leaves = nsa_case(T, 64, 4, PAPER, device)
    do = torch.randn_like(fwd())
    for _ in range(2):  # compile and warm up outside the trace
        fwd().backward(do)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the first call that makes the host wait for the GPU raises
    try:
        fwd().backward(do)
        sync = "none"
    except RuntimeError as e:
        import traceback
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "nsa_dist" in f.filename or "kernels" in f.filename]
        sync = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"first host sync of a fwd+bwd at T={T // 1024}k: {sync}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for x in leaves:
                x.grad = None
            fwd().backward(do)
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count:
            per_kernel[e.key] = (us / 1e3 / iters, e.count // iters)
    total = sum(ms for ms, _ in per_kernel.values())
    rows = [dict(row=f"profile:{name[:60]}", T=T, kernel_ms=ms, launches=n, share=ms / total)
            for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])]
    print(f"kernel time per paper-layer fwd+bwd at T={T // 1024}k: {total:.2f} ms")
    for r in rows:
        print(f"  {r['row'][8:]:<62}{r['kernel_ms']:>9.3f} ms {r['launches']:>5}x {100 * r['share']:>5.1f}%")
    rows.append(dict(row="profile:first host sync", T=T, note=sync))
    return rows


def measure(fwd, leaves, args):
    """(fwd ms, fwd+bwd ms); fwd+bwd is None for an op without gradient."""
    out = fwd()
    t_fwd = timed(fwd, None, args.warmup, args.rep)
    if leaves is None:
        return t_fwd, None
    do = torch.randn_like(out)
    del out

    def fwd_bwd():
        fwd().backward(do)
    return t_fwd, timed(fwd_bwd, leaves, args.warmup, args.rep)


def attempt(row, T, make, args, **extra):
    """A timed row from `make() -> (fwd, leaves, note)`; a failure becomes a "skipped" row."""
    try:
        fwd, leaves, note = make()
        t_fwd, t_fb = measure(fwd, leaves, args)
        return dict(row=row, T=T, **extra, fwd_ms=t_fwd, fwdbwd_ms=t_fb, **({"note": note} if note else {}))
    except torch.OutOfMemoryError as e:
        return dict(row=row, T=T, **extra, note=f"skipped: out of memory ({str(e).splitlines()[0][:120]})")
    except Exception as e:  # a peer that does not run on this card, an unsupported size: record and go on
        return dict(row=row, T=T, **extra, note=f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def shape_rows(shape, T, args, device):
    """nsa_dist's NSA core on a model's heads against cuDNN and each peer, the same q, k, v for all."""
    import peer_rows
    HQ, H, D = SHAPES[shape]
    leaves = qkv(T, HQ, H, D, device, seed=T + HQ + D)
    extra = dict(HQ=HQ, H=H, D=D)
    out = [attempt(f"core:{shape}", T, lambda: (*nsa_case(T, HQ, H, PAPER, device, D=D, leaves=leaves), ""), args, **extra),
           attempt(f"cudnn:{shape}", T, lambda: (*sdpa_case(T, HQ, H, "cudnn", device, D=D), ""), args, **extra)]
    for peer in PEERS if args.peers else ():
        def make():
            weights = torch.randn(1, T, HQ, 3, device=device, dtype=torch.bfloat16, requires_grad=True)
            fwd, note = peer_rows.core_case(args.peers, peer, *leaves, weights)
            return fwd, leaves + [weights], note
        out.append(attempt(f"{peer}:{shape}", T, make, args, **extra))
        torch.cuda.empty_cache()
    return out


def selection_rows(shape, T, routing, args, device):
    """Selected attention alone on `routing`'s block ids, nsa_dist and each peer on the same inputs;
    a peer's row notes its output's relative difference from nsa_dist's."""
    import peer_rows
    from routing import block_ids, union_sizes

    from nsa_dist.kernels import selection_attention
    HQ, H, D = SHAPES[shape]
    leaves = qkv(T, HQ, H, D, device, seed=T + HQ + D)
    idx = block_ids(T, H, routing, n=PAPER["top_n"], sel=PAPER["select_size"], seed=T, device=device)
    unions = ", ".join(f"union of {m}: {u:.1f}" for m, u in union_sizes(idx).items())
    extra = dict(HQ=HQ, H=H, D=D)

    def ours():
        return selection_attention(*leaves, idx, select_size=PAPER["select_size"], backend="triton")
    out = [attempt(f"sel:{shape}:{routing}", T, lambda: (ours, leaves, unions), args, **extra)]
    with torch.no_grad():
        ref = ours().float()
    for peer in PEERS if args.peers else ():
        def make():
            fwd, note = peer_rows.selection_case(args.peers, peer, *leaves, idx)
            with torch.no_grad():
                diff = ((fwd().float() - ref).norm() / ref.norm()).item()
            return fwd, leaves, f"rel. diff from nsa_dist {diff:.1e}" + (f"; {note}" if note else "")
        out.append(attempt(f"{peer}:sel:{shape}:{routing}", T, make, args, **extra))
    return out


def run_row(row, T, args, device):
    if row.startswith("shape:"):
        return shape_rows(row.split(":")[1], T, args, device)
    if row.startswith("sel:"):
        _, shape, routing = row.split(":")
        return selection_rows(shape, T, routing, args, device)
    suffix = next((s for s in ("_g4", "_g1") if row.endswith(s)), "")
    HQ, H = HEADS[suffix]
    base = row[: len(row) - len(suffix)] if suffix else row
    if base == "parts":
        return [dict(row=f"parts:{name}", T=T, HQ=64, H=4, **dict(zip(("fwd_ms", "fwdbwd_ms"), measure(f, lv, args))))
                for name, (f, lv) in parts_cases(T, device).items()]
    if base == "paper":
        fwd, leaves = nsa_case(T, HQ, H, PAPER, device)
    elif base == "nsa_fla":
        fwd, leaves = nsa_case(T, HQ, H, FLA, device)
    elif base in ("cudnn", "flash"):
        fwd, leaves = sdpa_case(T, HQ, H, base, device)
    elif base == "fla":
        fwd, leaves = fla_case(T, device)
    else:
        raise ValueError(row)
    t_fwd, t_fb = measure(fwd, leaves, args)
    return [dict(row=row, T=T, HQ=HQ, H=H, fwd_ms=t_fwd, fwdbwd_ms=t_fb)]


def ratios(results):
    """`ref/ours@T`: the reference's time over nsa_dist's (above 1: nsa_dist is faster); for the model
    shapes `cudnn/<shape>`, `mdy666/<shape>`, `fsa/<shape>` (NSA core) and `mdy666/sel:<shape>:<routing>`."""
    by = {(r["row"], r["T"]): r for r in results if "fwd_ms" in r}
    pairs = [("paper", "cudnn", "cudnn/paper"), ("paper", "flash", "flash/paper"), ("nsa_fla", "fla", "fla/nsa_fla"),
             ("paper_g4", "cudnn_g4", "cudnn_g4/paper_g4"), ("paper_g1", "cudnn_g1", "cudnn_g1/paper_g1")]
    for row, _ in by:
        if row.startswith("core:"):
            shape = row[5:]
            pairs += [(row, f"{ref}:{shape}", f"{ref}/{shape}") for ref in ("cudnn",) + PEERS]
        elif row.startswith("sel:"):
            pairs += [(row, f"{peer}:{row}", f"{peer}/{row}") for peer in PEERS]
    out = {}
    for (row, T), r in by.items():
        for nsa, ref, name in pairs:
            if row == nsa and (ref, T) in by:
                o = by[(ref, T)]
                out[f"{name}@{T // 1024}k"] = {
                    "fwd": o["fwd_ms"] / r["fwd_ms"],
                    "fwdbwd": o["fwdbwd_ms"] / r["fwdbwd_ms"] if o["fwdbwd_ms"] and r["fwdbwd_ms"] else None}
    return out


def table(results):
    lines = [f"{'row':<40}{'T':>7}{'fwd ms':>11}{'fwd+bwd ms':>13}  note"]
    for r in results:
        f = lambda x: f"{x:.2f}" if isinstance(x, float) else "-"  # noqa: E731
        note = r.get("note", "")
        if "kernel_ms" in r:
            note = f"{r['kernel_ms']:.3f} ms per fwd+bwd, {r['launches']} launches"
        lines.append(f"{r['row']:<40}{r['T'] // 1024:>6}k{f(r.get('fwd_ms')):>11}{f(r.get('fwdbwd_ms')):>13}  {note}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="8k,16k,32k,64k,128k", help="sequence lengths, e.g. 8k,64k")
    p.add_argument("--rows", default="paper,cudnn,flash,fla,nsa_fla", help=f"comma list from {ROWS}")
    p.add_argument("--group-T", default="16k,64k", help="lengths for the *_g4 / *_g1 rows")
    p.add_argument("--parts-T", default="64k", help="lengths for the per-op breakdown")
    p.add_argument("--groups", action="store_true", help="also run paper_g4, cudnn_g4, paper_g1, cudnn_g1")
    p.add_argument("--parts", action="store_true", help="also run the per-op breakdown")
    p.add_argument("--shapes", default="", help=f"model shapes from {tuple(SHAPES)}: NSA core vs cuDNN, selection")
    p.add_argument("--shape-T", default="16k,64k,128k", help="lengths for the model shapes' NSA core rows")
    p.add_argument("--paper-extra-T", default="8k", help="extra lengths for the paper shape's core rows")
    p.add_argument("--sel-T", default="64k", help="lengths for the model shapes' selection rows")
    p.add_argument("--routing", default="rand,blk,trained", help="block-id patterns of the selection rows")
    p.add_argument("--no-core", action="store_true", help="model shapes: selection rows only")
    p.add_argument("--peers", default=None, help="a staged peers folder (.peers): add mdy666's and FSA's rows")
    p.add_argument("--profile", default=None, help="per-kernel GPU time of the paper layer at these lengths")
    p.add_argument("--tune", default=None, help="time the kernels' tile-size candidates at this length, e.g. 64k")
    p.add_argument("--tune-knobs", default=None, help="only these entries of the tuning table, e.g. select,dense_dkdv")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device("cuda")
    plan = [(row, T) for T in parse_T(args.T) for row in args.rows.split(",") if row]
    if args.groups:
        plan += [(row, T) for T in parse_T(args.group_T) for row in ("paper_g4", "cudnn_g4", "paper_g1", "cudnn_g1")]
    if args.parts:
        plan += [("parts", T) for T in parse_T(args.parts_T)]
    shapes = [x for x in args.shapes.split(",") if x]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}: choose from {tuple(SHAPES)}")
    plan += [(f"sel:{shape}:{r}", T) for T in parse_T(args.sel_T) for shape in shapes for r in args.routing.split(",") if r]
    if not args.no_core:
        plan += [(f"shape:{shape}", T) for shape in shapes
                 for T in sorted(set(parse_T(args.shape_T) + (parse_T(args.paper_extra_T) if shape == "paper" else [])))]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                paper_config=PAPER, fla_config=FLA, B=1, D=128, dtype="bfloat16",
                compression="mean pooling inside the timed region (nsa_dist); inside parallel_nsa (fla)")
    try:
        import triton
        meta["triton"] = triton.__version__
        import fla
        meta["fla"] = getattr(fla, "__version__", "?")
    except ImportError as e:
        meta["fla"] = f"missing: {e}"
    if args.peers:
        import peer_rows
        meta["peers"] = {k: v if isinstance(v, str) else "ok" for k, v in peer_rows.load(args.peers).items()}
        print("peers:", meta["peers"], flush=True)
    results, t0 = [], time.time()
    if args.tune:
        results += tune(parse_T(args.tune)[0], args, device)
    for T in parse_T(args.profile or ""):
        results += profile_kernels(T, args, device)
        torch.cuda.empty_cache()
    for row, T in plan:
        if time.time() - t0 > args.budget_s:
            results.append(dict(row=row, T=T, note="skipped: time budget"))
            continue
        try:
            new = run_row(row, T, args, device)
            results += new
        except torch.OutOfMemoryError as e:
            results.append(dict(row=row, T=T, note=f"skipped: out of memory ({str(e).splitlines()[0][:120]})"))
            new = results[-1:]
        except Exception as e:  # a missing package, an unsupported size: record and go on
            results.append(dict(row=row, T=T, note=f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                                if str(e) else f"skipped: {type(e).__name__}"))
            new = results[-1:]
        torch.cuda.empty_cache()
        print("\n".join(table(new).splitlines()[1:]), flush=True)
    report = dict(meta=meta, results=results, ratios=ratios(results), seconds=time.time() - t0)
    print(table(results))
    for name, r in report["ratios"].items():
        print(f"{name:<28} fwd {r['fwd']:.2f}x" + (f"  fwd+bwd {r['fwdbwd']:.2f}x" if r["fwdbwd"] else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
