"""What the SHA-256 check of a run's files costs: saving and loading a state of `--gib` GiB of fp32 tensors
with nsa_dist.training.files, the digest checked (`load_file`) and not (`verify=False`).

    python bench/digest.py --gib 1 --dir /tmp

Prints one line per measurement (the median of `--repeats`; the file stays in the page cache, so the
load times are CPU-bound, the case where the hash's share is largest).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nsa_dist.training.files import digest_path, file_digest, load_file, save_atomically


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args()
    numel = int(args.gib * 2**30) // 4
    state = {f"layer{i}": torch.randn(numel // 8) for i in range(8)}  # (numel / 8,) fp32 each
    path = args.dir / "digest_bench.pt"
    try:
        save = timed(lambda: save_atomically(state, path), args.repeats)
        size = path.stat().st_size / 2**30
        digest = timed(lambda: file_digest(path), args.repeats)
        checked = timed(lambda: load_file(path), args.repeats)
        unchecked = timed(lambda: load_file(path, verify=False), args.repeats)
        print(f"file {size:.2f} GiB, {torch.get_num_threads()} threads")
        print(f"save (digest taken while writing): {save:.2f} s")
        print(f"sha256 of the file: {digest:.2f} s ({digest / size:.2f} s per GiB)")
        print(f"load, digest checked: {checked:.2f} s; not checked: {unchecked:.2f} s; "
              f"the check adds {checked - unchecked:.2f} s ({(checked - unchecked) / unchecked:.0%})")
    finally:
        path.unlink(missing_ok=True)
        digest_path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
