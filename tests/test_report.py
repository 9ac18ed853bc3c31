"""`python -m nsa_dist.report` over the real CPU scaling sweep (`-m experiment=scaling_smoke`: P = 1 and 2
at one N, collectives timed) and a projection."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nsa_dist import report

REPO = Path(__file__).resolve().parents[1]
N = 256  # conf/experiment/scaling_smoke.yaml's data.seq_len


def make_sweep(root: Path) -> dict[Path, int]:
    """Run the smoke sweep as a user would, one `--multirun` into `root`; returns run dir -> P."""
    cmd = [sys.executable, "-m", "nsa_dist.train", "-m", "experiment=scaling_smoke", f"hydra.sweep.dir={root}"]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert done.returncode == 0, f"the sweep failed:\n{done.stdout[-3000:]}"
    runs = {}
    for config in sorted(root.glob("*/.hydra/config.yaml")):
        cfg = yaml.safe_load(config.read_text())
        assert cfg["data"]["seq_len"] == N
        runs[config.parent.parent] = cfg["parallel"]["sp_size"]
    assert sorted(runs.values()) == [1, 2], f"the sweep's jobs: {runs}"
    return runs


def write_projection(run_dir: Path, out: Path) -> None:
    cmd = [sys.executable, "bench/project.py", "--from-run", str(run_dir), "--device", "cpu", "--n", str(N),
           "--p", "1,2", "--scaling", "strong", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    runs = make_sweep(root)
    projection = root / "projection.json"
    write_projection(next(iter(runs)), projection)
    out = root / "report"
    report.main([str(root), "--projections", str(projection), "--out", str(out)])
    return runs, out, json.loads(projection.read_text())["rows"]


def table_rows(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table under `## heading`, as {column: cell}."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_one_row_per_run_with_its_P_and_N(built):
    runs, out, _ = built
    rows = table_rows((out / "report.md").read_text(), "Measured")
    assert sorted((r["run"], r["P"], r["N"]) for r in rows) == sorted(
        (d.name, str(P), str(N)) for d, P in runs.items())
    by_P = {r["P"]: r for r in rows}
    assert by_P["1"]["speed-up"] == "1.00" and by_P["2"]["ideal"] == "2"
    assert float(by_P["2"]["tokens/s"]) > 0 and by_P["2"]["GPUs"] == "2"
    # the P = 2 run exchanges K/V and logs the all-gather baseline; P = 1 moves nothing and says so
    assert float(by_P["2"]["all-gather MB"]) > 0 and by_P["1"]["all-gather MB"] == report.MISSING
    assert by_P["1"]["MFU"] == report.MISSING  # no peak FLOPs on CPU: not made up


def test_the_time_split_comes_from_the_communication_timers(built):
    _, out, _ = built
    by_P = {r["P"]: r for r in table_rows((out / "report.md").read_text(), "Measured")}
    timers = ("exchange ms", "compressed all-gather ms", "halo ms")
    # P = 1 runs no collective, so there is nothing to time; P = 2 times all three (parallel.time_collectives)
    assert all(by_P["1"][t] == report.MISSING for t in timers)
    assert all(float(by_P["2"][t]) > 0 for t in timers), by_P["2"]
    assert 0 < float(by_P["2"]["compute ms"]) < float(by_P["2"]["step ms"])


def test_plots_are_real_pngs(built):
    _, out, _ = built
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png.name})" in (out / "report.md").read_text()


def test_projection_rows_appear_beside_the_measured_ones(built):
    _, out, projection = built
    text = (out / "report.md").read_text()
    assert "## Projections (modelled, not measured)" in text
    projected = table_rows(text, "Projections (modelled, not measured)")
    assert {(r["P"], r["N"]) for r in projected} == {(str(p["P"]), str(p["N"])) for p in projection}
    measured = {r["P"]: r for r in table_rows(text, "Measured")}
    assert all("(" in measured[P]["projected tokens/s (Δ)"] for P in ("1", "2"))
    compared = {r["P"]: r for r in table_rows(text, "Measured against projection")}
    assert compared["2"]["tokens/s Δ"] != report.MISSING
    # the all-gather baseline's bytes are a formula of the shapes: measured and projected agree exactly
    assert compared["2"]["all-gather MB Δ"] == "+0%"


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        report.write_report([tmp_path], tmp_path / "out")
