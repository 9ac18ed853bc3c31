"""`python -m nsa_dist.report` says what it compares: unfinished runs, runs of other configs, repeated
points and efficiencies above 100 % are named in the report. Each case is a row of docs/reliability.md.
"""
import subprocess
import sys

import pytest

from test_reliability_cli import TINY, run_cli

SHORT = (*TINY, "trainer.steps=4")


def _busy_cores(n: int) -> list[subprocess.Popen]:
    """Other work on the machine: what makes a baseline run slower than it should be."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs a user might point the report at: a P = 1 run measured on a busy machine, the same point
    again on a quiet one, a narrower model, and a run that failed at step 2."""
    root = tmp_path_factory.mktemp("runs")
    hogs = _busy_cores(3)
    try:
        done = run_cli(root, *SHORT, run_dir=root / "sweep" / "a_busy")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    for name, extra, code in (("b_repeat", (), 0), ("c_narrow", ("model.hidden_size=64",), 0),
                              ("d_failed", ("trainer.lr=1e9",), 1)):
        done = run_cli(root, *SHORT, *extra, run_dir=root / "sweep" / name)
        assert done.returncode == code, done.stderr[-3000:]
    return root


def report(root, *, env=None) -> tuple[subprocess.CompletedProcess, str]:
    done = run_cli(root, str(root / "sweep"), "--out", str(root / "out"), module="nsa_dist.report", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, (root / "out" / "report.md").read_text()


def paragraph(text: str, start: str) -> str:
    return next(p for p in text.split("\n\n") if p.startswith(start)).replace("\n", " ")


def test_the_report_names_what_it_compares(runs, fault_case):
    _, text = report(runs)
    unfinished = paragraph(text, "**1 unfinished run(s)**")
    assert "d_failed" in unfinished and "unfinished (2 of 4 steps, no final.pt)" in text
    fault_case("report_unfinished_run", "`python -m nsa_dist.report` over runs of which one failed at step 2",
               exit_code=0, seen=unfinished)
    groups = paragraph(text, "**The runs differ beyond the swept keys**")
    listed = paragraph(text, "- group B")
    assert "model.hidden_size=64 (A: 128)" in listed
    fault_case("report_config_groups", "`python -m nsa_dist.report` over runs whose model.hidden_size differs",
               exit_code=0, seen=f"{groups} {listed}")
    repeated = paragraph(text, "- 2 runs at P=1, N=128, dp=1 in group A")
    assert "(a_busy, b_repeat)" in repeated and "**Several runs measured the same point**" in text
    fault_case("report_same_point", "`python -m nsa_dist.report` over two P = 1 runs of the same config and N",
               exit_code=0, seen=f"Several runs measured the same point: {repeated}")
    rows = [line for line in text.splitlines() if line.startswith("| b_repeat")]
    efficiency = rows[0].split("|")[11].strip()
    # The busy baseline makes the repeat look faster than P times it: shown only with its note.
    assert efficiency.endswith("†"), rows
    note = paragraph(text, "† Efficiency above 100 %")
    fault_case("report_superlinear", "`python -m nsa_dist.report` where a P = 1 run's baseline ran on a busy "
               "machine", exit_code=0, seen=note)


def test_the_report_without_matplotlib_writes_the_tables(runs, fault_case, tmp_path):
    shadow = tmp_path / "no_matplotlib"
    shadow.mkdir()
    (shadow / "matplotlib.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", "
                                          "name='matplotlib')\n")
    done, text = report(runs, env={"PYTHONPATH": str(shadow)})
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no plots, matplotlib does not import" in lines[0], done.stderr[-3000:]
    assert "## Measured" in text and "## Plots" not in text
    fault_case("report_without_matplotlib", "`python -m nsa_dist.report` where matplotlib is not installed",
               exit_code=0, seen=lines[0])
