"""Logging for a rank this process started: it has none of Hydra's handlers."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def configure_rank_logging(rank: int, run_dir: Path) -> None:
    """Log to stdout (as Hydra's console does, leaving stderr to the one error line) and to
    run_dir/rank<r>.log, each line tagged with the rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / f"rank{rank}.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its lines joined), or its type's name when it has none."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def record_rank_failure(error: BaseException, rank: int, run_dir: Path, failures_dir: Path) -> None:
    """Keep a failing rank's traceback in its log file and its one-line message for the launching process,
    which reports it once for the job (instead of every rank and the agent printing their tracebacks)."""
    import json
    import traceback

    with (run_dir / f"rank{rank}.log").open("a") as f:
        traceback.print_exception(error, file=f)
    (failures_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "message": one_line(error)}))


def reported_failure(failures_dir: Path, run_dir: Path) -> str | None:
    """The lowest failing rank's message, naming its log, or None if no rank recorded one."""
    import json

    records = sorted((json.loads(p.read_text()) for p in failures_dir.glob("rank*.json")), key=lambda r: r["rank"])
    if not records:
        return None
    first, rank = records[0], records[0]["rank"]
    others = f"; ranks {[r['rank'] for r in records]} failed" if len(records) > 1 else ""
    return f"{first['message']} (rank {rank}, traceback in {run_dir / f'rank{rank}.log'}{others})"
