"""Issue 17 end to end with the real fairseq CLIs on CPU, on the real-format fixtures: MRQA windows trained
and validated to per-dataset EM/F1 (hyperdecoder_bart_tiny), and the summarisation + NLI mixture to ROUGE and
accuracy per task (hyperformer_bart_tiny, one task per batch, --split-validation-test). The eval script's
scores are recomputed independently from its predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from seq2seq_preprocess.mixture import preprocess as build_mixture
from seq2seq_preprocess.mrqa import preprocess as build_mrqa
from tests.fairseq_helpers import REPO, json_logs, run_tool
from tests.test_hyperdecoder_beyond_glue import official_f1, official_normalize
from tests.test_seq2seq_mrqa_nli import FIXTURES, gzipped_mrqa
from tests.test_seq2seq_preprocess import make_bart_files

pytestmark = pytest.mark.e2e

TINY = ["--max-source-positions", "256", "--max-target-positions", "256", "--dropout", "0", "--cpu"]
COMMON = [
    "--user-dir",
    REPO / "hyperdecoder_src",
    "-s",
    "source",
    "-t",
    "target",
    "--criterion",
    "label_smoothed_cross_entropy",
    "--optimizer",
    "adam",
    "--required-batch-size-multiple",
    "1",
    "--log-format",
    "json",
    "--log-interval",
    "1",
    "--num-workers",
    "0",
    "--no-epoch-checkpoints",
    "--save-interval",
    "1000",
    "--validate-interval",
    "1000",  # validate and save once, at the end
    "--seed",
    "1",
    *TINY,
]


def bpe_args(files):
    return {k: files[k] for k in ("gpt2_encoder_json", "gpt2_vocab_bpe", "srcdict")}


def evaluate(checkpoint, data, out: Path, *extra):
    """scripts/hyperdecoder_eval.py, run in this process (its CLI, without a second interpreter start)."""
    spec = importlib.util.spec_from_file_location("hyperdecoder_eval", REPO / "scripts" / "hyperdecoder_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report, predictions = out / "report.json", out / "predictions"
    script.main([str(checkpoint), str(data), "--cpu", "--json", str(report), "--predictions", str(predictions), *extra])
    return json.loads(report.read_text()), predictions


# ---------------------------------------------------------------------------------------------
# MRQA


@pytest.fixture(scope="module")
def mrqa_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mrqa")
    files = make_bart_files(root / "bart")
    build_mrqa(
        gzipped_mrqa(root / "raw"),
        root,
        **bpe_args(files),
        datasets="squad,bioasq",
        window=160,
        stride=32,
        max_question_tokens=32,
    )
    data, save = root / "mrqa-bin", root / "ck"
    # train on the in-domain dev windows themselves: a tiny model memorises enough to answer some
    log = run_tool(
        "fairseq-train",
        data,
        *COMMON,
        "--task",
        "hyperdecoder_mrqa",
        "--arch",
        "hyperdecoder_bart_tiny",
        "--no-freeze-backbone",
        "--train-subset",
        "valid_squad",
        "--valid-subset",
        "valid,test",
        "--hyperdecoder-eval-mrqa",
        "--lr",
        "3e-3",
        "--batch-size",
        "10",
        "--max-update",
        "45",
        "--save-dir",
        save,
        "--best-checkpoint-metric",
        "mrqa_f1",
        "--maximize-best-checkpoint-metric",
    )
    report, predictions = evaluate(save / "checkpoint_last.pt", data, root, "--split", "valid")
    return log.stdout + log.stderr, report, json.loads(predictions.read_text())


def test_mrqa_em_f1_from_the_lowest_nll_window(mrqa_run):
    log, report, predictions = mrqa_run
    golds = {}
    for line in (FIXTURES / "mrqa" / "dev" / "SQuAD.jsonl").read_text().splitlines()[1:]:
        golds.update({qa["qid"]: qa["answers"] for qa in json.loads(line)["qas"]})
    assert set(predictions) == set(golds) and [len(predictions[q]) for q in golds] == [3, 3, 3, 1]
    em = f1 = 0.0
    for qid, windows in predictions.items():  # the reference's mrqa_eval/eval.py rule, recomputed here
        answered = [w for w in windows if w[0] != ""]
        pred = min(answered, key=lambda w: w[1])[0] if answered else ""
        em += max(official_normalize(pred) == official_normalize(g) for g in golds[qid])
        f1 += max(official_f1(pred, g) for g in golds[qid])
    squad = report["datasets"]["SQuAD"]
    assert squad["n"] == 4
    assert squad["em"] == pytest.approx(100 * em / 4) and squad["f1"] == pytest.approx(100 * f1 / 4)
    assert squad["f1"] > 0  # the memorised model answers some questions
    # the same checkpoint's last validation in training: same numbers, in-domain and out-of-domain logged
    valid = json_logs(log, prefix="valid_")[-1]
    assert float(valid["valid_squad_f1"]) == pytest.approx(squad["f1"], abs=0.01)
    assert float(valid["valid_mrqa_in_f1"]) == float(valid["valid_mrqa_f1"]) == float(valid["valid_squad_f1"])
    test = json_logs(log, prefix="test_")[-1]
    assert "test_bioasq_em" in test and "test_mrqa_out_f1" in test


# ---------------------------------------------------------------------------------------------
# summarisation + NLI mixture, Hyperformer


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    files = make_bart_files(root / "bart")
    tasks = {"xsum": FIXTURES / "xsum" / "jsonl", "anli": FIXTURES / "anli", "art": FIXTURES / "art"}
    build_mixture(root, **bpe_args(files), **tasks, n_val=0, art_valid_from_train=0)  # ART: dev halved at training
    data, save = root / "mixture-bin", root / "ck"
    log = run_tool(
        "fairseq-train",
        data,
        *COMMON,
        "--task",
        "hyperdecoder_text2text",
        "--arch",
        "hyperformer_bart_tiny",
        "--one-task-per-batch",
        "--task-sampling-temperature",
        "10",
        "--split-validation-test",
        "--truncate-source",
        "--hyperdecoder-eval-text2text",
        "--hyperdecoder-eval-args",
        '{"beam": 1, "max_len_b": 12}',
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--max-update",
        "4",
        "--save-dir",
        save,
        "--best-checkpoint-metric",
        "t2t_avg",
        "--maximize-best-checkpoint-metric",
    )
    report, predictions = evaluate(save / "checkpoint_last.pt", data, root, "--split", "test", "--max-len-b", "12")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return log.stdout + log.stderr, report, rows


def test_mixture_per_task_metrics_and_hyperformer(mixture_run):
    from rouge_score import rouge_scorer

    from robustft_experiments.seq2seq_eval import split_sentences

    log, report, rows = mixture_run
    assert "valid = valid_anli, valid_art[half 1/2], valid_xsum" in log  # ART's dev has no test split: halved
    valid = json_logs(log, prefix="valid_")[-1]
    means = [float(valid[f"valid_{t}_accuracy"]) for t in ("anli", "art")]
    means.append(sum(float(valid[f"valid_xsum_{m}"]) for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")) / 4)
    assert float(valid["valid_t2t_avg"]) == pytest.approx(sum(means) / 3, abs=0.01)
    # the eval script on the test halves / test sets, recomputed from its predictions
    by_task: dict[str, list] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert {t: len(r) for t, r in by_task.items()} == {"anli": 3, "art": 1, "xsum": 2}
    for task in ("anli", "art"):
        correct = sum(r["prediction"].strip() == r["reference"] for r in by_task[task])
        assert report["tasks"][task]["accuracy"] == pytest.approx(100 * correct / len(by_task[task]))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    for metric in ("rouge1", "rouge2", "rougeLsum"):
        expected = [
            scorer.score(split_sentences(r["reference"]), split_sentences(r["prediction"]))[metric].fmeasure
            for r in by_task["xsum"]
        ]
        assert report["tasks"]["xsum"][metric] == pytest.approx(100 * sum(expected) / len(expected))
