"""Scaling report: training runs (and projections) into one markdown table and PNG plots.

    python -m nsa_dist.report multirun/2026-12-01/10-00-00 outputs/2026-12-01/11-00-00 --out report/
    python -m nsa_dist.report RUNS... --projections bench/results/projection_H200.json --out report/

A run is a directory written by `python -m nsa_dist.train` (`.hydra/config.yaml`, `tensorboard/`,
`train_log.jsonl`); a `--multirun` sweep directory holds numbered runs and is searched for them.
Every figure is a median over the logged steps after the first (the first step warms up and
compiles); a column that no run logs shows "—". Projection rows (bench/project.py's JSON) go in a
table of their own, and beside a measured row of the same (P, N) with the relative difference.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

MISSING = "—"
STATISTIC = "median over the logged steps after the first (all steps when only one was logged)"
# The collectives' seconds per step (forward + backward, summed over layers) that a run with
# parallel.time_collectives logs (metrics.exchange_totals); the forward/backward phases include them.
COMM_TIMERS = {"exchange": "comm/exchange_s", "compressed all-gather": "comm/compressed_allgather_s",
               "halo": "comm/halo_s"}
COMPUTE_PHASES = ("time/forward_s", "time/backward_s", "time/optimizer_s")
COMM_BYTES = ("comm/exchange_bytes", "comm/halo_bytes", "comm/compressed_bytes", "comm/allgather_bytes")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories at or below `paths`, in path order."""
    found = set()
    for root in paths:
        for config in [root / ".hydra" / "config.yaml", *root.rglob(".hydra/config.yaml")]:
            if config.is_file() and (config.parent.parent / "tensorboard").is_dir():
                found.add(config.parent.parent.resolve())
    return sorted(found)


def read_scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under `tensorboard_dir`: `{tag: {step: value}}`, later files winning."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(tensorboard_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def robust(values_by_step: dict[int, float] | None) -> float | None:
    if not values_by_step:
        return None
    steps = sorted(values_by_step)
    kept = steps[1:] if len(steps) > 1 else steps
    return statistics.median(values_by_step[s] for s in kept)


# The keys a scaling sweep varies (and what follows from them); runs that differ in any other key measure
# different things and are compared in groups of their own.
SWEPT_KEYS = ("parallel.sp_size", "parallel.dp_size", "data.seq_len")
# Keys that say how a run was started or kept, not what it computes.
UNCOMPARED_PREFIXES = ("launcher.", "trainer.resume", "trainer.checkpoint_", "trainer.move_old_run",
                       "trainer.progress_bar", "trainer.log_every", "trainer.eval_every")


@dataclass
class Run:
    path: Path
    name: str
    P: int
    N: int
    dp: int
    world_size: int
    scalars: dict
    step_log: list = field(default_factory=list)
    config: dict = field(default_factory=dict)  # flattened, every key
    steps: int | None = None  # trainer.steps asked
    finished: bool = True  # wrote final.pt
    group: str = ""  # the label of its config group, when the runs differ beyond SWEPT_KEYS

    @property
    def state(self) -> str:
        if self.finished:
            return "finished"
        logged = max((r["step"] for r in self.step_log if "step" in r), default=-1) + 1
        return f"unfinished ({logged} of {self.steps} steps, no final.pt)"

    def compared_config(self) -> dict:
        return {k: v for k, v in self.config.items()
                if k not in SWEPT_KEYS and not k.startswith(UNCOMPARED_PREFIXES)}

    def stat(self, tag: str) -> float | None:
        return robust(self.scalars.get(tag))

    @property
    def tokens_per_s(self) -> float | None:
        return self.stat("train/tokens_per_s")

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        per_device = self.stat("train/tokens_per_s_per_device")
        if per_device is None and self.tokens_per_s is not None:
            return self.tokens_per_s / self.world_size
        return per_device

    @property
    def step_s(self) -> float | None:
        logged = {r["step"]: r["step_s"] for r in self.step_log if "step_s" in r}
        return robust(logged)

    def time_split(self) -> dict[str, float | None]:
        """Seconds per step: compute (forward + backward + optimizer, less the communication timers
        when the run logs them) and each communication timer."""
        comm = {name: self.stat(tag) for name, tag in COMM_TIMERS.items()}
        phases = [self.stat(t) for t in COMPUTE_PHASES]
        compute = None
        if any(p is not None for p in phases):
            compute = sum(p for p in phases if p is not None) - sum(c for c in comm.values() if c is not None)
        return {"compute": compute, **comm}

    @property
    def peak_memory_bytes(self) -> float | None:
        values = self.scalars.get("memory/peak_bytes")
        return max(values.values()) if values else None


def load_run(path: Path, root_names: list[Path]) -> Run:
    import nsa_dist.config  # noqa: F401 - registers ${mul:...}, which a weak-scaling data.seq_len is written with

    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    P = int(OmegaConf.select(cfg, "parallel.sp_size", default=None) or 1)
    world = P * int(OmegaConf.select(cfg, "parallel.dp_size", default=None) or 1)
    dist_file = path / "distributed.json"
    if dist_file.is_file():
        world = int(json.loads(dist_file.read_text()).get("world_size", world))
    step_log = []
    log_file = path / "train_log.jsonl"
    if log_file.is_file():
        step_log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    name = next((str(path.relative_to(r)) for r in root_names if path.is_relative_to(r) and path != r), path.name)
    return Run(path=path, name=name, P=P, N=int(OmegaConf.select(cfg, "data.seq_len")), dp=max(1, world // P),
               world_size=world, scalars=read_scalars(path / "tensorboard"), step_log=step_log,
               config=_flatten(OmegaConf.to_container(cfg, resolve=True)),
               steps=OmegaConf.select(cfg, "trainer.steps", default=None), finished=(path / "final.pt").is_file())


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def group_runs(runs: list[Run]) -> list[str]:
    """Label each run's config group (A, B, ...) when the runs differ beyond the swept keys; returns one line
    per group saying how it differs from the first."""
    configs: list[dict] = []
    for run in runs:
        if run.compared_config() not in configs:
            configs.append(run.compared_config())
    if len(configs) < 2:
        return []
    for run in runs:
        run.group = chr(ord("A") + configs.index(run.compared_config()))
    first = configs[0]
    lines = []
    for i, config in enumerate(configs[1:], 1):
        keys = sorted(k for k in set(first) | set(config) if first.get(k) != config.get(k))
        shown = ", ".join(f"{k}={config.get(k)} (A: {first.get(k)})" for k in keys[:6])
        lines.append(f"- group {chr(ord('A') + i)}: {shown}{' ...' if len(keys) > 6 else ''}")
    return lines


def duplicate_points(runs: list[Run]) -> list[str]:
    """One line per (group, P, N, dp) that more than one run measured: which run the speed-ups use."""
    seen: dict[tuple, list[Run]] = {}
    for run in runs:
        seen.setdefault((run.group, run.P, run.N, run.dp), []).append(run)
    return [f"- {len(same)} runs at P={P}, N={N}, dp={dp}{f' in group {g}' if g else ''} "
            f"({', '.join(r.name for r in same)}): repeats or unrelated runs; speed-ups use {same[0].name}"
            for (g, P, N, dp), same in seen.items() if len(same) > 1]


def baseline_of(run: Run, runs: list[Run]) -> Run | None:
    """The P = 1 run of the same N, data-parallel degree and config group (the first, in path order)."""
    return next((b for b in runs if b.P == 1 and b.N == run.N and b.dp == run.dp and b.group == run.group
                 and b.tokens_per_s), None)


SUPERLINEAR = "†"


def load_projections(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        data = json.loads(Path(f).read_text())
        for row in data.get("rows", []):
            rows.append({**row, "source": str(f)})
    return rows


def projection_for(run: Run, projections: list[dict]) -> dict | None:
    same = [p for p in projections if p["P"] == run.P and p["N"] == run.N]
    return next((p for p in same if p.get("scaling") == "strong"), same[0] if same else None)


def fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return format(value * scale, spec)


def rel_diff(measured, projected) -> str:
    if measured is None or projected is None or not measured:
        return MISSING
    return f"{(projected - measured) / measured:+.0%}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def measured_table(runs: list[Run], projections: list[dict]) -> str:
    header = ["run", "state", "group", "P", "N", "GPUs", "tokens/s", "tokens/s/GPU", "speed-up", "ideal", "efficiency",
              "step ms", "compute ms", "exchange ms", "compressed all-gather ms", "halo ms", "exchanged MB",
              "halo+cmp MB",
              "all-gather MB", "exchanged / all-gather", "peak mem GiB", "MFU", "projected tokens/s (Δ)"]
    rows = []
    for run in runs:
        base = baseline_of(run, runs)
        speedup = run.tokens_per_s / base.tokens_per_s if base and run.tokens_per_s else None
        split = run.time_split()
        exchanged, halo, compressed, allgather = (run.stat(t) for t in COMM_BYTES)
        side = None if halo is None and compressed is None else (halo or 0) + (compressed or 0)
        ratio = exchanged / allgather if exchanged is not None and allgather else None
        proj = projection_for(run, projections)
        proj_cell = MISSING if proj is None else \
            f"{proj['tokens_per_s']:.3g} ({rel_diff(run.tokens_per_s, proj['tokens_per_s'])})"
        efficiency = speedup / run.P if speedup else None
        efficiency_cell = fmt(efficiency, ".0%") + (f" {SUPERLINEAR}" if efficiency and efficiency > 1 else "")
        rows.append([run.name, run.state, run.group or MISSING, str(run.P), str(run.N), str(run.world_size),
                     fmt(run.tokens_per_s), fmt(run.tokens_per_s_per_gpu), fmt(speedup, ".2f"),
                     str(run.P) if base else MISSING, efficiency_cell, fmt(run.step_s, ".1f", 1e3),
                     fmt(split["compute"], ".1f", 1e3), fmt(split["exchange"], ".2f", 1e3),
                     fmt(split["compressed all-gather"], ".2f", 1e3), fmt(split["halo"], ".2f", 1e3),
                     fmt(exchanged, ".3g", 1e-6), fmt(side, ".3g", 1e-6), fmt(allgather, ".3g", 1e-6),
                     fmt(ratio, ".2f"), fmt(run.peak_memory_bytes, ".2f", 2**-30), fmt(run.stat("train/mfu"), ".1%"),
                     proj_cell])
    return md_table(header, rows)


def projection_table(projections: list[dict]) -> str:
    header = ["scaling", "P", "N", "card", "compute ms", "exchange ms", "compressed all-gather ms", "halo ms",
              "all-gather baseline ms", "step ms", "tokens/s", "tokens/s/GPU", "speed-up", "efficiency",
              "selected K/V by", "source"]
    rows = [[p.get("scaling", MISSING), str(p["P"]), str(p["N"]), p.get("card", MISSING),
             fmt(p["compute_s"], ".2f", 1e3), fmt(p["exchange_s"], ".3f", 1e3),
             fmt(p["compressed_allgather_s"], ".3f", 1e3), fmt(p["halo_s"], ".3f", 1e3),
             fmt(p["allgather_baseline_s"], ".3f", 1e3), fmt(p["step_s"], ".2f", 1e3), fmt(p["tokens_per_s"]),
             fmt(p["tokens_per_s_per_gpu"]), fmt(p.get("speedup"), ".2f"), fmt(p.get("efficiency"), ".0%"),
             "all-gather (fallback)" if p.get("fell_back") else "exchange", Path(p["source"]).name]
            for p in projections]
    return md_table(header, rows)


def comparison_table(runs: list[Run], projections: list[dict]) -> str | None:
    header = ["run", "P", "N"] + [f"{what} {kind}" for what in ("tokens/s", "exchanged MB", "all-gather MB")
                                  for kind in ("measured", "projected", "Δ")]
    rows = []
    for run in runs:
        proj = projection_for(run, projections)
        if proj is None:
            continue
        measured = {t: run.stat(t) for t in COMM_BYTES}
        projected = proj.get("bytes_rank0", {})
        cells = [run.name, str(run.P), str(run.N), fmt(run.tokens_per_s), fmt(proj["tokens_per_s"]),
                 rel_diff(run.tokens_per_s, proj["tokens_per_s"])]
        for key in ("exchange_bytes", "allgather_bytes"):
            m, p = measured[f"comm/{key}"], projected.get(key)
            cells += [fmt(m, ".3g", 1e-6), fmt(p, ".3g", 1e-6), rel_diff(m, p)]
        rows.append(cells)
    return md_table(header, rows) if rows else None


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_speedup(runs, projections, out: Path) -> Path | None:
    points = {}
    for run in runs:
        base = baseline_of(run, runs)
        if base and run.tokens_per_s:
            points.setdefault(run.N, []).append((run.P, run.tokens_per_s / base.tokens_per_s))
    projected = {}
    for p in projections:
        if p.get("scaling") == "strong" and p.get("speedup") is not None:
            projected.setdefault(p["N"], []).append((p["P"], p["speedup"]))
    if sum(len(v) for v in points.values()) + sum(len(v) for v in projected.values()) < 2:
        return None
    plt, fig, ax = _figure()
    all_P = sorted({P for v in [*points.values(), *projected.values()] for P, _ in v})
    ax.plot(all_P, all_P, "k--", label="ideal")
    for N, pts in sorted(points.items()):
        ax.plot(*zip(*sorted(pts)), "o-", label=f"measured N={N}")
    for N, pts in sorted(projected.items()):
        ax.plot(*zip(*sorted(pts)), "s:", mfc="none", label=f"projected N={N}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_P, [str(P) for P in all_P])
    ax.set_xlabel("P (sequence-parallel ranks)")
    ax.set_ylabel("speed-up over P = 1")
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, out / "speedup.png", "Strong scaling: speed-up against ideal")


def plot_tokens_per_gpu(runs, projections, out: Path) -> Path | None:
    points = {}
    for run in runs:
        if run.tokens_per_s_per_gpu is not None:
            points.setdefault(run.N, []).append((run.P, run.tokens_per_s_per_gpu))
    projected = {}
    for p in projections:
        if p.get("scaling") == "strong":
            projected.setdefault(p["N"], []).append((p["P"], p["tokens_per_s_per_gpu"]))
    if not points and not projected:
        return None
    plt, fig, ax = _figure()
    for N, pts in sorted(points.items()):
        ax.plot(*zip(*sorted(pts)), "o-", label=f"measured N={N}")
    for N, pts in sorted(projected.items()):
        ax.plot(*zip(*sorted(pts)), "s:", mfc="none", label=f"projected N={N}")
    all_P = sorted({P for v in [*points.values(), *projected.values()] for P, _ in v})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_P, [str(P) for P in all_P])
    ax.set_xlabel("P (sequence-parallel ranks)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, out / "tokens_per_gpu.png", "Throughput per GPU")


def plot_time_split(runs, out: Path) -> Path | None:
    splits = [(run, run.time_split()) for run in runs]
    splits = [(run, s) for run, s in splits if any(v is not None for v in s.values())]
    if not splits:
        return None
    plt, fig, ax = _figure()
    labels = [f"P={run.P}\nN={run.N}" for run, _ in splits]
    bottom = [0.0] * len(splits)
    for part in ("compute", *COMM_TIMERS):
        heights = [1e3 * (s[part] or 0.0) for _, s in splits]
        if any(s[part] is not None for _, s in splits):
            timed_comm = any(s[c] is not None for _, s in splits for c in COMM_TIMERS)
            label = part if part != "compute" or timed_comm else "forward + backward + optimizer (comm. included)"
            ax.bar(labels, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, out / "time_split.png", "Step time split")


def plot_bytes(runs, out: Path) -> Path | None:
    have = [(run, run.stat("comm/exchange_bytes"), run.stat("comm/allgather_bytes")) for run in runs]
    have = [h for h in have if h[1] is not None and h[2] is not None]
    if not have:
        return None
    plt, fig, ax = _figure()
    x = range(len(have))
    ax.bar([i - 0.2 for i in x], [1e-6 * h[1] for h in have], width=0.4, label="selected K/V exchanged")
    ax.bar([i + 0.2 for i in x], [1e-6 * h[2] for h in have], width=0.4, label="all-gather baseline")
    ax.set_xticks(list(x), [f"P={h[0].P}\nN={h[0].N}" for h in have])
    ax.set_ylabel("MB sent per rank per step")
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, out / "bytes.png", "Bytes against the all-gather baseline")


def plot_memory(runs, out: Path) -> Path | None:
    points = {}
    for run in runs:
        if run.peak_memory_bytes is not None:
            points.setdefault(run.P, []).append((run.N, run.peak_memory_bytes / 2**30))
    if not points:
        return None
    plt, fig, ax = _figure()
    for P, pts in sorted(points.items()):
        ax.plot(*zip(*sorted(pts)), "o-", label=f"P={P}")
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel("peak memory, GiB")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, out / "memory.png", "Peak memory against N")


def write_report(paths: list[Path], out: Path, projection_files: list[Path] = ()) -> Path:
    roots = [p.resolve() for p in paths]
    runs = [load_run(p, roots) for p in find_runs(roots)]
    projections = load_projections(list(projection_files))
    if not runs and not projections:
        raise SystemExit(f"no runs (a directory with .hydra/config.yaml and tensorboard/) under {paths}")
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, projections, out)
    parts = ["# Scaling report", "",
             f"{len(runs)} measured run(s) from {', '.join(str(p) for p in paths)}. Every measured figure is the "
             f"{STATISTIC}. Speed-up is tokens/s over the P = 1 run of the same N and data-parallel degree; "
             "efficiency is speed-up / P. Bytes are what rank 0 sent per step, summed over layers (comm/* scalars). "
             f"{MISSING} marks what the runs do not log.", ""]
    if runs and all(run.time_split()["exchange"] is None for run in runs):
        parts += [f"The runs log no communication timers ({', '.join(COMM_TIMERS.values())}; a run logs them "
                  "with parallel.time_collectives=true): compute is forward + backward + optimizer and includes "
                  "any communication.", ""]
    parts += _caveats(runs, groups)
    parts += ["## Measured", "", measured_table(runs, projections) if runs else "No measured runs.", ""]
    if projections:
        parts += ["## Projections (modelled, not measured)", "",
                  "From bench/project.py: one rank's attention work timed on the card named, collectives modelled "
                  "from their bytes and a bandwidth table; see docs/scaling.md for what the model leaves out.", "",
                  projection_table(projections), ""]
        comparison = comparison_table(runs, projections)
        if comparison:
            parts += ["## Measured against projection", "", "Δ = (projected − measured) / measured.", "",
                      comparison, ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report


def _caveats(runs: list[Run], groups: list[str]) -> list[str]:
    """What the table compares that a reader must know: unfinished runs, config groups, repeated points,
    efficiencies above 100 %."""
    parts = []
    unfinished = [run for run in runs if not run.finished]
    if unfinished:
        parts += [f"**{len(unfinished)} unfinished run(s)** (no final.pt: stopped, failed or still running; their "
                  f"figures cover only the steps logged): {', '.join(r.name for r in unfinished)}.", ""]
    if groups:
        parts += ["**The runs differ beyond the swept keys** (" + ", ".join(SWEPT_KEYS) + "): they are compared only "
                  "within their group (column `group`); each group's speed-ups use its own P = 1 run.", "", *groups, ""]
    repeated = duplicate_points(runs)
    if repeated:
        parts += ["**Several runs measured the same point**:", "", *repeated, ""]
    superlinear = [run for run in runs if (base := baseline_of(run, runs)) and run.tokens_per_s
                   and run.tokens_per_s / base.tokens_per_s / run.P > 1]
    if superlinear:
        parts += [f"{SUPERLINEAR} Efficiency above 100 % ({', '.join(r.name for r in superlinear)}): more than P "
                  "times the P = 1 run's throughput is rarely real; most often the baseline ran slower (another "
                  "load on the machine, a repeat of the same point, a shorter or unfinished run). Check before "
                  "quoting it.", ""]
    return parts


def _plots(runs: list[Run], projections: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        print(f"nsa_dist.report: warning: no plots, matplotlib does not import ({e}): pip install "
              "'nsa_dist[report]' for them; report.md has every table", file=sys.stderr)
        return []
    return [p for p in (plot_speedup(runs, projections, out), plot_tokens_per_gpu(runs, projections, out),
                        plot_time_split(runs, out), plot_bytes(runs, out), plot_memory(runs, out)) if p]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m nsa_dist.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories; projection .json files too")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the PNG plots")
    parser.add_argument("--projections", nargs="*", type=Path, default=[], help="bench/project.py JSON files")
    args = parser.parse_args(argv)
    dirs = [p for p in args.paths if p.suffix != ".json"]
    projection_files = [*args.projections, *(p for p in args.paths if p.suffix == ".json")]
    for missing in [p for p in [*dirs, *projection_files] if not p.exists()]:
        parser.error(f"{missing} does not exist")
    report = write_report(dirs, args.out, projection_files)
    print(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
