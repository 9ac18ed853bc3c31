"""Compile the Triton kernels that tests/gpu and bench/kernels.py launch, in parallel processes.

Triton compiles on first launch, one kernel at a time (seconds each, ~50 variants across group
sizes and head dims); filling the on-disk cache from several processes at once first saves
minutes. Tiny shapes: the compiled variant depends on the compile-time
constants (group size, head dims, dtype) and on integer divisibility by 16, not on T.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time

CASES = [  # (HQ, H, D, DV, dtype, l, d, l', n, w, packed documents)
    (16, 1, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (64, 4, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (64, 4, 128, 128, "bfloat16", 64, 64, 64, 16, 0, False),
    (16, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (16, 4, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (4, 4, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (8, 1, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (4, 1, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (2, 1, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (2, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (8, 2, 256, 64, "float16", 32, 16, 64, 8, 128, True),
    # the model shapes of bench/kernels.py --shapes, and the group sizes of test_selection_group_sizes
    (32, 8, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (32, 8, 64, 64, "bfloat16", 32, 16, 64, 16, 512, False),
    (28, 4, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (4, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (8, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (14, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
    (32, 2, 128, 128, "bfloat16", 32, 16, 64, 16, 512, False),
]


def run(case):
    import torch
    from nsa_dist.kernels import nsa_attention
    HQ, H, D, DV, dtype, l, d, sel, n, w, packed = case
    dt = getattr(torch, dtype)
    T = 2048
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt, requires_grad=True)  # noqa: E731
    q, k, v = mk(1, T, HQ, D), mk(1, T, H, D), mk(1, T, H, DV)
    cu = torch.tensor([0, 500, 501, 1500, T], device="cuda", dtype=torch.int32) if packed else None
    Tc = sum((b - a - l) // d + 1 for a, b in zip([0, 500, 501, 1500], [500, 501, 1500, T]) if b - a >= l) \
        if packed else (T - l) // d + 1
    kc, vc = mk(1, Tc, H, D), mk(1, Tc, H, DV)
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=dt, requires_grad=True) for _ in range(3)]
    o = nsa_attention(q, k, v, kc, vc, gates[0], gates[1], gates[2] if w else None, block_len=l, stride=d,
                      select_size=sel, top_n=n, window=w, cu_seqlens=cu, backend="triton")
    o.float().sum().backward()
    torch.cuda.synchronize()
    return case


if __name__ == "__main__":
    # optional arguments HQ/H/D (e.g. 32/8/64) keep only those cases
    wanted = set(sys.argv[1:])
    cases = [c for c in CASES if not wanted or f"{c[0]}/{c[1]}/{c[2]}" in wanted]
    t0 = time.time()
    with mp.get_context("spawn").Pool(max(1, min(len(cases), 14))) as pool:
        for case in pool.imap_unordered(run, cases):
            print(f"compiled {case[:5]} at {time.time() - t0:.0f}s", flush=True)
    sys.exit(0)
