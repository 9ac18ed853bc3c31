"""Logging for a rank this process started: it has none of Hydra's handlers."""
from __future__ import annotations

import logging
from pathlib import Path


def configure_rank_logging(rank: int, run_dir: Path) -> None:
    """Log to stderr and to run_dir/rank<r>.log, each line tagged with the rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / f"rank{rank}.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
