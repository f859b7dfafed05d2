"""The report (robustft_experiments.report) on fixture fairseq logs; the sweep (robustft_experiments.sweep)
end to end (real fairseq-train) and restart; scripts/sweep.py and scripts/report.py are thin entry points."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from robustft_common.methods import METHODS, method_flags
from robustft_experiments import report, sweep
from robustft_testing import forkserver
from tests.fairseq_helpers import REPO, TINY_ROBERTA, make_sentence_prediction_data

FIXTURES = Path(__file__).parent / "fixtures" / "sweep_logs"

# best dev metric per fixture run, read off the fixture logs by hand
EXPECTED_BEST = {
    ("RTE", "vanilla"): [61.4, 59.9, 63.2],
    ("RTE", "r3f"): [64.3, 66.1],  # seed 3 crashed
    ("CoLA", "vanilla"): [52.25, 48.0],  # json log format, metric mcc
    ("CoLA", "r3f"): [54.0],  # seed 2 "ok" but never validated -> failed
}


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sweep"
    shutil.copytree(FIXTURES, out)
    result = report.write_report(out, title="fixture")
    return out, result


def test_best_metric_per_run_from_simple_and_json_logs(fixture_report):
    out, result = fixture_report
    rows = {(r["task"], r["method"], r["seed"]): r for r in result["rows"]}
    for (task, method), values in EXPECTED_BEST.items():
        ok = sorted(r["best"] for k, r in rows.items() if k[:2] == (task, method) and r["status"] == "ok")
        assert ok == sorted(values)
    # the valid1 line (accuracy 99.9) is another subset and never counts
    assert rows[("RTE", "vanilla", 1)]["best_num_updates"] == 100
    assert rows[("RTE", "vanilla", 1)]["last"] == 60.0
    assert rows[("RTE", "r3f", 3)]["status"] == "failed" and rows[("RTE", "r3f", 3)]["best"] is None
    assert rows[("CoLA", "r3f", 2)]["status"] == "failed"
    assert rows[("CoLA", "vanilla", 1)]["metric"] == "mcc"


def test_mean_std_table_csv_json_plot(fixture_report):
    out, result = fixture_report
    summary = {(s["method"], s["task"]): s for s in json.loads((out / "results.json").read_text())["summary"]}
    for (task, method), values in EXPECTED_BEST.items():
        s = summary[(method, task)]
        assert s["n"] == len(values)
        assert s["mean"] == pytest.approx(np.mean(values))
        assert s["std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    assert summary[("r3f", "RTE")]["failed"] == 1
    md = (out / "results.md").read_text()
    v = EXPECTED_BEST[("RTE", "vanilla")]
    assert f"| Vanilla | {np.mean(EXPECTED_BEST[('CoLA', 'vanilla')]):.2f} ± " in md  # CoLA column first
    assert f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f} (n=3)" in md
    assert "(n=2), 1 failed" in md
    # paper layout: methods as rows, tasks as columns (GLUE order), average column
    header = md.splitlines()[4]
    assert header.startswith("| Method | CoLA (mcc) | RTE (accuracy) | Avg |")
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_landed_and_unknown_task():
    rows = [{"task": "RTE", "method": "pats", "seed": 1, "status": "not_landed", "best": None}]
    assert "| PATS | not landed |" in report.markdown_table(rows)
    assert report.canonical_task("sts-b") == "STS-B" and report.canonical_task("sst2") == "SST-2"
    with pytest.raises(SystemExit, match="unknown GLUE task"):
        report.canonical_task("squad")


def test_rows_follow_the_registry_order_and_labels():
    """Method rows in registry order with registry labels; a method the registry lacks keeps its name."""
    names = ["pats", "hype_u_official", "vanilla", "oldmethod", "hype_u", "vanilla_adamax"]
    rows = [{"task": "RTE", "method": m, "seed": 1, "status": "ok", "best": 50.0 + i} for i, m in enumerate(names)]
    labels = [line.split("|")[1].strip() for line in report.markdown_table(rows).splitlines()[2:]]
    assert labels == ["Vanilla", "HyPe-U", "HyPe-U (official code)", "Vanilla (Adamax)", "PATS", "oldmethod"]


def test_task_flags_follow_metric():
    assert sweep.task_flags("STS-B")[:3] == ["--num-classes", "1", "--regression-target"]
    assert "--report-mcc" in sweep.task_flags("CoLA")
    cola = sweep.task_flags("CoLA")
    assert cola[cola.index("--best-checkpoint-metric") + 1] == "mcc"


@pytest.fixture(scope="module")
def toy_sweep_args(tmp_path_factory):
    """The toy sweep's data and command line, not run (emitting jobs needs no finished run)."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_sentence_prediction_data(root / "toy", n_train=32, n_valid=16)
    (root / "data").mkdir()
    (root / "data" / "RTE-bin").symlink_to(data)  # the sweep finds <TASK>-bin under --data-root
    argv = [
        "--data-root",
        str(root / "data"),
        "--output-dir",
        str(root / "out"),
        "--tasks",
        "RTE",
        "--methods",
        "vanilla,r3f",
        "--seeds",
        "1",
        "--cpu",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--max-update",
        "3",
        "--validate-interval-updates",
        "3",
        "--log-interval",
        "1",
        "--quiet",
        "--threads",
        "1",
        "--extra-args",
        " ".join(map(str, TINY_ROBERTA)),
    ]
    return root, argv


@pytest.fixture(scope="module")
def toy_sweep(toy_sweep_args):
    root, argv = toy_sweep_args
    return root, argv, sweep.main(argv)


@pytest.mark.e2e
def test_sweep_runs_fairseq_and_reports(toy_sweep):
    root, _, rc = toy_sweep
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((root / "out" / "results.json").read_text())["runs"]}
    for method in ("vanilla", "r3f"):
        log = (root / "out" / "runs" / "RTE" / method / "seed1" / "train.log").read_text()
        vals = [r["accuracy"] for r in report.parse_valid_records(log)]
        assert rows[method]["status"] == "ok" and rows[method]["best"] == max(vals)
        assert "num_updates: 3 >= max_update: 3" in log
    r3f_cmd = json.loads((root / "out" / "runs" / "RTE" / "r3f" / "seed1" / "command.json").read_text())["cmd"]
    assert "sentence_prediction_r3f" in r3f_cmd
    start = r3f_cmd.index("--criterion")  # the registry's flags, in order, in the command
    assert r3f_cmd[start : start + len(METHODS["r3f"].flags)] == method_flags("r3f")


@pytest.mark.e2e
def test_sweep_restart_skips_finished_runs(toy_sweep):
    root, argv, _ = toy_sweep
    run_dir = root / "out" / "runs" / "RTE"
    before = {m: (run_dir / m / "seed1" / "train.log").stat().st_mtime_ns for m in ("vanilla", "r3f")}
    (run_dir / "r3f" / "seed1" / "status.json").unlink()  # as if killed mid-run
    assert sweep.main(argv + ["--no-report"]) == 0
    assert (run_dir / "vanilla" / "seed1" / "train.log").stat().st_mtime_ns == before["vanilla"]
    assert (run_dir / "r3f" / "seed1" / "train.log").stat().st_mtime_ns != before["r3f"]
    assert json.loads((run_dir / "r3f" / "seed1" / "status.json").read_text())["status"] == "ok"


def test_emit_jobs_one_command_per_run(toy_sweep_args, tmp_path):
    root, argv = toy_sweep_args
    jobs = tmp_path / "jobs.txt"
    assert sweep.main(argv + ["--seeds", "1,2", "--emit-jobs", str(jobs)]) == 0
    lines = jobs.read_text().splitlines()
    assert len(lines) == 4 and all("--only-run" in line for line in lines)
    assert str(jobs) not in lines[0]


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'not_a_method'"):
        sweep.main(
            [
                "--data-root",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "o"),
                "--methods",
                "not_a_method",
                "--dry-run",
            ]
        )


def test_adamax_family_takes_its_own_lr(tmp_path):
    args = sweep.build_parser().parse_args(
        [
            "--data-root",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "o"),
            "--methods",
            "vanilla,pats,sage",
            "--lr",
            "2e-5",
            "--lr-adamax",
            "1e-4",
        ]
    )
    lrs = {run["method"]: run["cmd"][run["cmd"].index("--lr") + 1] for run in sweep.plan(args)}
    assert lrs == {"vanilla": "2e-05", "pats": "0.0001", "sage": "0.0001"}


@pytest.mark.e2e
def test_scripts_are_thin_entry_points_without_path_hacks():
    for path in (REPO / "scripts").rglob("*.py"):
        assert "sys.path.insert" not in path.read_text(), path
    for name in ("sweep", "report"):
        proc = forkserver.run([sys.executable, REPO / "scripts" / f"{name}.py", "--help"], cwd="/")
        assert proc.returncode == 0 and re.search(r"usage: \S+", proc.stdout), proc.stderr[-2000:]
