"""Smoke test of benchmarks/run.py on the tiny size: every configuration runs through the real fairseq
Trainer in its worker process and the JSON + markdown outputs are consistent. No timing assertions."""

import json
import math
import os
import statistics
import sys

import pytest

from robustft_testing import forkserver
from tests.fairseq_helpers import REPO

# fairseq-train runs / training in-process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

RUN = REPO / "benchmarks" / "run.py"
EXPECTED = [
    "vanilla",
    "adamax",
    "r3f",
    "r4f",
    "hype",
    "hype_r3f",
    "rdrop",
    "neftune",
    "mixout",
    "adamax_pats",
    "adamax_sage",
    "childtuning_f",
    "childtuning_d",
    "smart",
    "freelb",
    "single_adapter",
    "hyperdecoder",
    "bart_ls",
    "bart_r3f",
    "ref_vanilla",
    "ref_r3f",
]
BASELINES = {
    "adamax": "vanilla",
    "r3f": "vanilla",
    "r4f": "vanilla",
    "hype": "vanilla",
    "hype_r3f": "vanilla",
    "rdrop": "vanilla",
    "neftune": "vanilla",
    "mixout": "vanilla",
    "adamax_pats": "adamax",
    "adamax_sage": "adamax",
    "childtuning_f": "vanilla",
    "childtuning_d": "vanilla",
    "smart": "vanilla",
    "freelb": "vanilla",
    "hyperdecoder": "single_adapter",
    "bart_r3f": "bart_ls",
    "ref_r3f": "ref_vanilla",
}


def _run(*args):
    return forkserver.run([sys.executable, RUN, *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(
        "--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "0", "--optimizer-steps", "2", "--out", out
    )
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
    # optimizer.step() alone (what scripts/bench_pats_overhead.py timed), after the train steps
    for name, blocks in result["raw_blocks"].items():
        assert len(blocks[0]["opt_times_s"]) == 2 and min(blocks[0]["opt_times_s"]) > 0, name


def test_method_configurations_take_the_registry_flags(tiny):
    """Each method configuration runs the registry's flags (dropout kept for HyPe: the noise's cost alone);
    the baselines are the registry's with fairseq's own loss."""
    from robustft_common.methods import method_flags

    argv = tiny[1]["argv"]

    def tail(name, n):
        return argv[name][-n:]

    for name, method, overrides in (
        ("r3f", "r3f", {}),
        ("r4f", "r4f", {}),
        ("hype", "hype_n", {"--dropout": None}),
        ("hype_r3f", "hype_r3f", {"--dropout": None}),
        ("rdrop", "rdrop", {}),
        ("neftune", "neftune", {}),
        ("mixout", "mixout", {"--dropout": None, "--attention-dropout": None}),
        ("smart", "smart", {}),
        ("freelb", "freelb", {}),
        ("bart_ls", "vanilla_seq2seq", {}),
        ("bart_r3f", "r3f_seq2seq", {}),
        ("ref_r3f", "r3f", {}),
    ):
        flags = method_flags(method, overrides)
        assert tail(name, len(flags)) == flags, name
    stock = {"--criterion": "sentence_prediction", "--hype-type": None}
    for name, method in (
        ("vanilla", "vanilla"),
        ("adamax", "vanilla_adamax"),
        ("adamax_pats", "pats"),
        ("adamax_sage", "sage"),
        ("childtuning_f", "childtuning_f"),
        ("childtuning_d", "childtuning_d"),
        ("ref_vanilla", "vanilla"),
    ):
        flags = method_flags(method, stock)
        assert tail(name, len(flags)) == flags, name


def test_childtuning_d_fisher_pass_is_timed_apart(tiny):
    """ChildTuning-D's Fisher pass (once per run) is reported per batch, not inside its step times."""
    _, result, text, _ = tiny
    row = result["configs"]["childtuning_d"]
    assert row["fisher_batch_ms"] > 0 and row["fisher_batch_cpu_ms"] > 0
    assert "`childtuning_d`'s Fisher pass" in text and "fisher_batch_s" in result["raw_blocks"]["childtuning_d"][0]


def test_ratios_match_the_raw_step_times(tiny):
    _, result, _, _ = tiny
    raw = {n: [t for b in blocks for t in b["times_s"]] for n, blocks in result["raw_blocks"].items()}
    rows = result["configs"]
    opt = {n: [t for b in blocks for t in b["opt_times_s"]] for n, blocks in result["raw_blocks"].items()}
    for name, base in BASELINES.items():
        expected = statistics.median(raw[name]) / statistics.median(raw[base])
        assert rows[name]["x_baseline"] == pytest.approx(expected, rel=1e-9), name
        assert rows[name]["baseline"] == base
        assert rows[name]["opt_step_x_baseline"] == pytest.approx(
            statistics.median(opt[name]) / statistics.median(opt[base]), rel=1e-9
        ), name
    assert rows["ref_r3f"]["x_vanilla"] == pytest.approx(
        statistics.median(raw["ref_r3f"]) / statistics.median(raw["ref_vanilla"]), rel=1e-9
    )
    checks = {c["check"]: c for c in result["targets"]}
    assert set(checks) == {
        "r3f <= 2x vanilla",
        "hype <= 1.03x vanilla",
        "rdrop <= 2x vanilla",
        "neftune <= 1.02x vanilla",
        "mixout <= 1.15x vanilla",
        "childtuning_f <= 1.1x vanilla",
        "smart <= 3.67x vanilla",
        "freelb <= 4.4x vanilla",
        "adamax_pats <= 1.08x adamax",
        "hyperdecoder <= 1.15x single_adapter",
        "bart_r3f <= 2.1x bart_ls",
        "bart_r3f peak memory (peak_rss_over_before_mb) <= 2.5x bart_ls",
        "r3f x vanilla <= reference R3F x its vanilla",
    }
    for check in checks.values():
        limit = check.get("reference")
        if limit is None:
            limit = float(check["check"].split("<= ")[1].split("x")[0])
        assert check["met"] == (check["value"] <= limit)


def test_markdown_table_has_one_row_per_configuration(tiny):
    out, result, md, stdout = tiny
    assert md == stdout
    step_table, opt_table = md.split("| config | optimizer.step ms |")  # --optimizer-steps: a second table

    def names(text):
        return [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]

    assert names(step_table) == EXPECTED and names(opt_table) == EXPECTED
    assert "| config | what | wall ms" in md and "reference R3F" in md
    # each configuration's real command line is recorded
    assert "--spectral-norm-classification-head" in result["argv"]["r4f"]
    assert any(a.endswith("examples/rxf/rxf_src") for a in result["argv"]["ref_r3f"])


def test_shape_options_and_on_demand_configurations(tmp_path):
    """--layers/--dim/--batch/--seq-len reshape the RoBERTa configurations (scripts/bench_hype_overhead.py's
    knobs); adamax_pats_noise0 (scripts/bench_pats_overhead.py's "noise 0" row) runs when named."""
    proc = _run(
        "--size",
        "tiny",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        tmp_path,
        "--only",
        "vanilla,hype,adamax,adamax_pats_noise0",
        "--layers",
        "1",
        "--dim",
        "32",
        "--batch",
        "2",
        "--seq-len",
        "16",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "tiny-layers1-dim32-batch2-seqlen16.json").read_text())
    assert result["meta"]["shape_overrides"] == {"layers": 1, "dim": 32, "batch": 2, "seq_len": 16}
    assert (result["meta"]["batch"], result["meta"]["seq_len"]) == (2, 16)
    rows = result["configs"]
    assert list(rows) == ["vanilla", "hype", "adamax", "adamax_pats_noise0"]
    assert rows["adamax_pats_noise0"]["baseline"] == "adamax"
    # RoBERTa with 1 layer of width 32 (FFN 128, 1 head), 1000-entry dictionary (specials and <mask>
    # included), 128 + 2 learned positions, counted by hand:
    d, ffn, vocab, positions = 32, 128, 1000, 128 + 2
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * ffn + ffn) + (ffn * d + d)
    embeddings = vocab * d + positions * d + 2 * d  # tokens, learned positions, embedding LayerNorm
    lm_head = d * d + d + 2 * d + vocab  # dense, LayerNorm, output bias (weight tied to the embeddings)
    head = d * d + d + 2 * d + 2  # classification head: dense, out_proj to 2 classes
    assert rows["vanilla"]["params"] == embeddings + layer + lm_head + head
    from robustft_common.methods import flag_value

    assert flag_value(result["argv"]["adamax_pats_noise0"], "--pats-noise") == "0"


def test_unknown_configuration_is_named():
    proc = _run("--only", "vanilla,bogus")
    assert proc.returncode != 0 and "bogus" in proc.stderr and "choose from" in proc.stderr
