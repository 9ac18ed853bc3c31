"""Training entry point: `python -m nsa_dist.train` or `nsa-train`, a Hydra app over nsa_dist.conf.

`main(cfg)` converts the composed config to a `RunConfig` once (nsa_dist.config.run_config), checks what
can fail before any rank starts, has nsa_dist.launch start the ranks the `launcher` section asks for,
and on each rank joins the process group and calls nsa_dist.training.loop.train. Outputs land in the
run directory (Hydra's, unless `run_dir` is given). See docs/training.md.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nsa_dist import launch
from nsa_dist.config import RunConfig, run_config
from nsa_dist.data.sources import check_token_file, split_sizes
from nsa_dist.launch.rank_logging import one_line
from nsa_dist.training import distributed
from nsa_dist.training.checkpoint import checkpoint_root
from nsa_dist.training.loop import TrainResult, train

__all__ = ["main", "cli", "train_rank"]

log = logging.getLogger(__name__)

# The user's HYDRA_FULL_ERROR, read before cli() sets it for Hydra: 1 shows tracebacks instead of one line.
_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def _default_run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def main(cfg: DictConfig, *, run_dir: str | Path | None = None) -> TrainResult:
    """Train from a composed config (what `nsa_dist.conf/config.yaml` composes to, with overrides).

    With launcher=torchrun|ray this process starts the ranks, each runs `train_rank`, and rank 0's result
    comes back; otherwise this process is the one rank (or one of the ranks torchrun or Slurm started).
    """
    run = run_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir()
    check_before_start(run, run_dir)
    return launch.start_ranks(run.launcher, train_rank, run, run_dir, device=run.trainer.device, run_dir=run_dir)


def check_before_start(run: RunConfig, run_dir: Path) -> None:
    """What can fail before any rank starts, checked here: the mesh against the world the launcher will
    start, the data (the token file's ids and dtype, both splits of text and files), the output directories."""
    world = launch.planned_world_size(run.launcher)
    if world is not None:
        try:
            run.parallel.degrees(world)
        except ValueError as e:
            raise ValueError(f"{e} (launcher={run.launcher.kind} starts {world})") from e
    if run.data.kind == "tokens":
        log.info("checked %s", check_token_file(run.data.path, run.data.token_dtype, vocab_size=run.model.vocab_size))
    if run.data.kind in ("text", "files"):
        sizes = split_sizes(run.data, vocab_size=run.model.vocab_size)
        log.info("data.path=%s: %d files, %d bytes to train on; %d files, %d bytes held out", run.data.path,
                 sizes["train_documents"], sizes["train_bytes"], sizes["eval_documents"], sizes["eval_bytes"])
    _check_writable(run_dir, "the run directory (hydra.run.dir)")
    if run.trainer.checkpoint_every:
        _check_writable(checkpoint_root(run.trainer, run_dir), "trainer.checkpoint_dir")


def _check_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {directory} is not writable ({e.strerror or e}): choose another") from e


def train_rank(run: RunConfig, run_dir: Path) -> TrainResult:
    """One rank of the job: join the group the environment describes, train, leave the group."""
    dist_ctx = distributed.init_process_group(backend=run.launcher.backend, timeout_s=run.launcher.timeout_s,
                                              device=run.trainer.device, run_dir=run_dir)
    try:
        return train(run, run_dir=run_dir, hparams=asdict(run), dist_ctx=dist_ctx)
    finally:
        distributed.destroy_process_group(dist_ctx)


@hydra.main(config_path="pkg://nsa_dist.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        main(cfg)
    except Exception as e:
        if _FULL_ERROR:
            raise
        # Not an Exception: Hydra passes it through without its "Error executing job" report.
        raise SystemExit(error_line(e)) from None


def error_line(error: BaseException) -> str:
    """An exception as the one line the command line prints."""
    text = one_line(error)
    cause = error.__cause__
    # Hydra's composition errors keep the reason (e.g. "Key 'foo' not in 'TrainConfig'") in their cause.
    if cause is not None and type(cause).__module__.startswith("omegaconf") and str(cause).strip():
        text = f"{text} ({str(cause).strip().splitlines()[0]})"
    return f"nsa_dist: error: {text}"


def _validate_shown_config(argv: list[str]) -> None:
    """`--cfg job` only prints the config; convert it too, so that an invalid one fails the same way a run would."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if not args.cfg or args.multirun:
        return
    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        cfg = compose(config_name=args.config_name or "config", overrides=args.overrides)
    run_config(cfg)


def cli() -> None:
    """The `nsa-train` console script: Hydra parses the command line; an error is one line on stderr and
    exit status 1 (HYDRA_FULL_ERROR=1: the whole traceback instead)."""
    # Hydra then re-raises instead of printing its own report, and the one line is written below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _validate_shown_config(sys.argv[1:])
        _hydra_main()
    except Exception as e:
        if _FULL_ERROR:
            raise
        print(error_line(e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
