"""Training entry point: `python -m nsa_dist.train` or `nsa-train`, a Hydra app over nsa_dist.conf.

`main(cfg)` converts the composed config to a `RunConfig` once (nsa_dist.config.run_config), checks what
can fail before any rank starts, has nsa_dist.launch start the ranks the `launcher` section asks for,
and on each rank joins the process group and calls nsa_dist.training.loop.train. Outputs land in the
run directory (Hydra's, unless `run_dir` is given). See docs/training.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
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
from nsa_dist.training.checkpoint import CheckpointDir, checkpoint_root, run_sections
from nsa_dist.training.loop import TrainResult, train
from nsa_dist.training.run_dir import RunDirLock, check_run_dir, move_old_run

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
    if not RunDirLock(run_dir).held_here():  # held: the command line checked all of it before Hydra started
        check_before_start(run, run_dir)
    with holding_run_dir(run, run_dir):
        return launch.start_ranks(run.launcher, train_rank, run, run_dir, device=run.trainer.device, run_dir=run_dir)


def check_before_start(run: RunConfig, run_dir: Path) -> None:
    """What can fail before any rank starts, checked here without writing anything: the mesh against the
    world the launcher will start, the run directory (another run's files or lock), the output
    directories, and the data (the token file's ids and dtype, both splits of text and files)."""
    world = launch.planned_world_size(run.launcher)
    if world is not None:
        try:
            run.parallel.degrees(world)
        except ValueError as e:
            raise ValueError(f"{e} (launcher={run.launcher.kind} starts {world})") from e
    if _launching_process():
        check_run_dir(run_dir, run.trainer, run_sections(run))
    _check_writable(run_dir, "the run directory (hydra.run.dir)")
    if run.trainer.checkpoint_every:
        _check_writable(checkpoint_root(run.trainer, run_dir), "trainer.checkpoint_dir")
    if run.launcher.kind == "ray":
        _check_ray_installed()
    if run.data.kind == "tokens":
        log.info("checked %s", check_token_file(run.data.path, run.data.token_dtype, vocab_size=run.model.vocab_size))
    if run.data.kind in ("text", "files"):
        sizes = split_sizes(run.data, vocab_size=run.model.vocab_size)
        log.info("data.path=%s: %d files, %d bytes to train on; %d files, %d bytes held out", run.data.path,
                 sizes["train_documents"], sizes["train_bytes"], sizes["eval_documents"], sizes["eval_bytes"])


def _check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"launcher=ray needs Ray, which does not import here ({e}): pip install 'nsa_dist[launch]', "
                           "or start the ranks with launcher=torchrun on one machine") from None


def _launching_process() -> bool:
    """Whether this process speaks for the job: not one of the ranks torchrun or Slurm started beside rank 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def _check_writable(directory: Path, what: str) -> None:
    """Whether `directory` could be made and written, asked of its nearest existing ancestor (nothing is made)."""
    probe = directory.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    reason = "Not a directory" if not probe.is_dir() else \
        None if os.access(probe, os.W_OK | os.X_OK) else "Permission denied"
    if reason:
        raise ValueError(f"{what} {directory} is not writable ({reason}): choose another")


@contextlib.contextmanager
def holding_run_dir(run: RunConfig, run_dir: Path):
    """The run directory made, locked by this process while the run writes (after the old run is moved aside
    with trainer.move_old_run=true); on a failure, the directories made here are removed again if empty."""
    lock = RunDirLock(run_dir)
    if not _launching_process() or lock.held_here():  # the command line took it before Hydra started
        yield
        return
    if run.trainer.move_old_run:
        move_old_run(run_dir, run.trainer)
    made = _missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
        yield
    except BaseException:
        lock.release()
        _remove_if_empty(made)
        raise
    finally:
        lock.release()


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        missing.append(d)
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or gone): neither it nor its ancestors are ours to remove


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
    if type(error).__name__ == "OverrideParseException":
        text = _unparsed_override(str(error)) or text
    return f"nsa_dist: error: {text}"


def _unparsed_override(message: str) -> str | None:
    """Hydra's lexer error for an override as the character it stopped at and the quoting that fixes it."""
    lines = message.splitlines()
    if len(lines) < 2 or not lines[0].startswith("LexerNoViableAltException: ") or "=" not in lines[0]:
        return None
    override = lines[0].removeprefix("LexerNoViableAltException: ")
    column = lines[1].find("^") - len("LexerNoViableAltException: ")
    char = override[column] if 0 <= column < len(override) else "?"
    key, value = override.split("=", 1)
    return (f"cannot read the override {override}: Hydra takes no {char!r} in an unquoted value; quote the value, "
            f"e.g. \"{key}='{value}'\" in the shell")


def _hydra_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return args


def _compose(args, *, hydra_config: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        return compose(config_name=args.config_name or "config", overrides=args.overrides,
                       return_hydra_config=hydra_config)


def _check_before_hydra(argv: list[str]) -> tuple[RunConfig, Path] | None:
    """Every check of a single run, before Hydra writes its first file into the run directory (`.hydra/`,
    the job log), so that a refused command leaves nothing behind. Returns the run and its directory,
    which Hydra is then given (its `${now:...}` is resolved once, here); None when Hydra writes no run
    directory (`--cfg`, `--help`, ...) or runs a sweep, whose jobs are checked each in its own directory."""
    args = _hydra_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.multirun:
        return None
    if args.cfg:
        run_config(_compose(args))  # `--cfg job` only prints the config; an invalid one fails as a run would
        return None
    cfg = _compose(args, hydra_config=True)
    run = run_config(cfg)
    run_dir = Path(str(cfg.hydra.run.dir))
    check_before_start(run, run_dir)
    return run, run_dir


def _with_run_dir(argv: list[str], run_dir: Path) -> list[str]:
    value = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [a for a in argv if not a.startswith(("hydra.run.dir=", "++hydra.run.dir="))] + [f"hydra.run.dir='{value}'"]


def interrupted_line(run: RunConfig, run_dir: Path, argv: list[str]) -> str:
    """What Ctrl-C prints: where the run stopped, its last checkpoint and how to go on."""
    steps = [json.loads(line)["step"] for line in _lines(run_dir / "train_log.jsonl")]
    where = f"after step {steps[-1] + 1} of {run.trainer.steps}" if steps else "before the first step"
    latest = CheckpointDir(checkpoint_root(run.trainer, run_dir)).latest()
    if latest is None:
        how = ("no checkpoint to resume from (trainer.checkpoint_every=N writes them); start again with "
               "trainer.move_old_run=true or another hydra.run.dir")
    else:
        kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "trainer.resume=", "trainer.move_old_run="))]
        how = (f"last checkpoint {latest}; resume with: python -m nsa_dist.train {' '.join(kept)} "
               f"trainer.resume=auto hydra.run.dir={run_dir}").replace("  ", " ")
    return f"nsa_dist: interrupted {where}: {how}"


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def cli() -> None:
    """The `nsa-train` console script: Hydra parses the command line; an error is one line on stderr and
    exit status 1 (HYDRA_FULL_ERROR=1: the whole traceback instead); Ctrl-C is one line and status 130."""
    # Hydra then re-raises instead of printing its own report, and the one line is written below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    argv = sys.argv[1:]
    checked = None
    try:
        checked = _check_before_hydra(argv)
        if checked is None:
            _hydra_main()
            return
        run, run_dir = checked
        with holding_run_dir(run, run_dir):
            sys.argv = [sys.argv[0], *_with_run_dir(argv, run_dir)]
            _hydra_main()
    except KeyboardInterrupt:
        if _FULL_ERROR:
            raise
        print("nsa_dist: interrupted" if checked is None else interrupted_line(*checked, argv), file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if _FULL_ERROR:
            raise
        print(error_line(e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
