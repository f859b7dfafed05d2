"""Smoke test of benchmarks/run.py on the tiny size: every configuration runs through the real fairseq
Trainer in its worker process and the JSON + markdown outputs are consistent. No timing assertions."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tests.fairseq_helpers import REPO

RUN = REPO / "benchmarks" / "run.py"
EXPECTED = ["vanilla", "adamax", "r3f", "r4f", "hype", "hype_r3f", "adamax_pats", "adamax_sage",
            "single_adapter", "hyperdecoder", "ref_vanilla", "ref_r3f"]
BASELINES = {"adamax": "vanilla", "r3f": "vanilla", "r4f": "vanilla", "hype": "vanilla", "hype_r3f": "vanilla",
             "adamax_pats": "adamax", "adamax_sage": "adamax", "hyperdecoder": "single_adapter",
             "ref_r3f": "ref_vanilla"}


def _run(*args):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run("--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "0", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text(), proc.stdout


def test_every_configuration_ran_real_train_steps(tiny):
    _, result, _, _ = tiny
    assert list(result["configs"]) == EXPECTED
    for name, blocks in result["raw_blocks"].items():
        assert len(blocks) == 1 and len(blocks[0]["times_s"]) == 2, name
        block = blocks[0]
        assert all(t > 0 and math.isfinite(t) for t in block["times_s"] + block["cpu_times_s"]), name
        assert block["skipped_steps"] == 0 and math.isfinite(block["loss"]), name
        assert block["peak_rss_mb"] >= block["rss_before_mb"] > 0, name
    # the Hyperdecoder comparison differs only in the decoder adapters: same frozen backbone
    rows = result["configs"]
    assert rows["hyperdecoder"]["params"] > rows["single_adapter"]["params"]
    assert rows["r4f"]["params"] == rows["r3f"]["params"] == rows["vanilla"]["params"]


def test_ratios_match_the_raw_step_times(tiny):
    _, result, _, _ = tiny
    raw = {n: [t for b in blocks for t in b["times_s"]] for n, blocks in result["raw_blocks"].items()}
    rows = result["configs"]
    for name, base in BASELINES.items():
        expected = statistics.median(raw[name]) / statistics.median(raw[base])
        assert rows[name]["x_baseline"] == pytest.approx(expected, rel=1e-9), name
        assert rows[name]["baseline"] == base
    assert rows["ref_r3f"]["x_vanilla"] == pytest.approx(
        statistics.median(raw["ref_r3f"]) / statistics.median(raw["ref_vanilla"]), rel=1e-9)
    checks = {c["check"]: c for c in result["targets"]}
    assert set(checks) == {"r3f <= 2x vanilla", "hype <= 1.03x vanilla", "adamax_pats <= 1.08x adamax",
                           "hyperdecoder <= 1.15x single_adapter",
                           "r3f x vanilla <= reference R3F x its vanilla"}
    for check in checks.values():
        limit = check.get("reference")
        if limit is None:
            limit = float(check["check"].split("<= ")[1].split("x")[0])
        assert check["met"] == (check["value"] <= limit)


def test_markdown_table_has_one_row_per_configuration(tiny):
    out, result, md, stdout = tiny
    assert md == stdout
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == EXPECTED
    assert "| config | what | wall ms" in md and "reference R3F" in md
    # each configuration's real command line is recorded
    assert "--spectral-norm-classification-head" in result["argv"]["r4f"]
    assert any(a.endswith("examples/rxf/rxf_src") for a in result["argv"]["ref_r3f"])


def test_unknown_configuration_is_named():
    proc = _run("--only", "vanilla,bogus")
    assert proc.returncode != 0 and "bogus" in proc.stderr and "choose from" in proc.stderr
