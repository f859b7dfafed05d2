"""R3F beyond GLUE end to end (issue 16), on a tiny BART and a tiny XLM-R-shaped model (RoBERTa layers over a
sentencepiece vocabulary): release fixture -> seq2seq_preprocess -> scripts/recipes/seq2seq.sh (SCHEDULE=tiny:
the paper recipe's flags on CPU, a few updates) -> generation with the dataset's BART decoding settings ->
ROUGE / XNLI per-language accuracy, each checked against an independent computation; and the noise reaching
the encoder of both models (symmetric KL > 0 with every dropout at 0)."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustft_common import methods
from robustft_experiments import seq2seq_eval
from seq2seq_preprocess import preprocess
from tests.fairseq_helpers import REPO, TINY_ENCODER_DECODER, TINY_ROBERTA, json_logs
from tests.test_r3f import build
from tests.test_seq2seq_preprocess import FIXTURES, make_bart_files, make_xlmr_files

pytestmark = pytest.mark.e2e

RECIPE = REPO / "scripts" / "recipes" / "seq2seq.sh"
TINY_BART = ["--arch", "bart_base", *TINY_ENCODER_DECODER]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


def recipe(root: Path, dataset: str, method: str, arch: list[str], dry_run=False, **env) -> subprocess.CompletedProcess:
    """scripts/recipes/seq2seq.sh at SCHEDULE=tiny (3 updates on CPU), logging every update."""
    full_env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DATA_ROOT=str(root / "data"),
        MODEL_PATH=str(root / "no_pretrained_model.pt"),  # tiny: from random init
        SAVE_ROOT=str(root / "ckpt"),
        SCHEDULE="tiny",
        TINY_UPDATES="3",
        ARCH_ARGS=shlex.join(arch),
        EXTRA="--log-interval 1",
        PY=sys.executable,
        METHOD_TEXT=methods._bash(method),  # what `python -m robustft_common.methods bash METHOD` prints
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **({"DRY_RUN": "1"} if dry_run else {}),
        **env,
    )
    proc = subprocess.run(["bash", str(RECIPE), dataset, method, "1"], capture_output=True, text=True, env=full_env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def kl_with_no_dropout(root: Path, dataset: str, method: str, arch: list[str]) -> float:
    """symm_kl of one training-mode criterion call built from the recipe's own flags, dropout 0, eps 0.01."""
    argv = shlex.split(recipe(root, dataset, method, arch, dry_run=True).stdout)
    argv += [*NO_DROPOUT, "--eps", "1e-2", "--cpu"]
    _, model, criterion, sample = build(argv, split="train", n=3)
    model.train()
    torch.manual_seed(0)
    _, _, log = criterion(model, sample)
    return float(log["symm_kl"])


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bart_e2e")
    files = make_bart_files(root / "bart")
    preprocess("cnn_dm", FIXTURES / "cnn_dm" / "stories", root / "data", log=lambda s: None, **files)
    proc = recipe(root, "cnn_dm", "r3f_seq2seq", TINY_BART)
    return root, proc


def test_bart_r3f_cnn_dm_fixture_to_rouge(bart_run):
    root, proc = bart_run
    train = [r for r in json_logs(proc.stdout + proc.stderr) if "train_inner" in str(r) or "symm_kl" in r]
    assert train and all(float(r["symm_kl"]) > 0 for r in train if "symm_kl" in r)
    checkpoint = root / "ckpt" / "cnn_dm" / "r3f_seq2seq" / "seed1" / "checkpoint_last.pt"
    result = seq2seq_eval.evaluate_summarization(
        checkpoint, root / "data" / "cnn_dm-bin", "test", root / "eval", cpu=True
    )
    assert result["generation"] | {"flags": None} == {  # BART's CNN/DM settings (summarize.py CNN_KWARGS)
        "beam": 4,
        "lenpen": 2.0,
        "max_len_b": 140,
        "min_len": 55,
        "no_repeat_ngram_size": 3,
        "source": result["generation"]["source"],
        "flags": None,
    }
    hyps = (root / "eval" / "test.hyp").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == result["n"] == 1 and hyps[0]
    # independent: rouge-score on the written hypothesis and the highlights read from the .story file
    from rouge_score import rouge_scorer

    story = next((FIXTURES / "cnn_dm" / "stories" / "cnn" / "stories").glob("469c6ac0*.story")).read_text()
    highlights = [line for line in story.split("@highlight")[1:]]
    reference = "\n".join(h.strip() if h.strip()[-1] in ".!?" else h.strip() + " ." for h in highlights)
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True).score(
        reference, seq2seq_eval.split_sentences(hyps[0])
    )
    for key in ("rouge1", "rouge2", "rougeLsum"):
        assert result["rouge"][key] == pytest.approx(100 * scores[key].fmeasure)
    report = seq2seq_eval.report([{**result, "method": "r3f_seq2seq"}])
    assert "| cnn_dm | paper: BART+R3F | 44.38 | 21.53 | 41.17 |" in report
    assert f"| cnn_dm | ours: r3f_seq2seq | {result['rouge']['rouge1']:.2f} |" in report


def test_bart_noise_reaches_the_encoder(bart_run):
    root, _ = bart_run
    assert kl_with_no_dropout(root, "cnn_dm", "r3f_seq2seq", TINY_BART) > 0


@pytest.fixture(scope="module")
def xlmr_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlmr_e2e")
    files = make_xlmr_files(root / "xlmr")
    preprocess("xnli", FIXTURES / "xnli", root / "data", log=lambda s: None, **files)
    proc = recipe(root, "xnli", "r3f", TINY_ROBERTA)
    return root, proc


def test_xlmr_r3f_xnli_fixture_to_per_language_accuracy(xlmr_run):
    root, proc = xlmr_run
    assert any(float(r.get("symm_kl", 0)) > 0 for r in json_logs(proc.stdout + proc.stderr))
    checkpoint = root / "ckpt" / "xnli" / "r3f" / "seed1" / "checkpoint_last.pt"
    result = seq2seq_eval.evaluate_xnli(checkpoint, root / "data" / "xnli-bin", root / "eval", cpu=True)
    languages = "ar bg de el en es fr hi ru sw th tr ur vi zh".split()
    assert sorted(result["accuracy"]) == sorted([*languages, "avg"])
    # independent: the predictions against the gold labels read from xnli.test.tsv with csv (QUOTE_NONE)
    predictions = json.loads((root / "eval" / "predictions.json").read_text())
    with open(FIXTURES / "xnli" / "XNLI-1.0" / "xnli.test.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    order = ["entailment", "neutral", "contradiction"]
    for lang in languages:
        gold = [order.index(r["gold_label"]) for r in rows if r["language"] == lang]
        pred = predictions[f"test_{lang}"]
        assert len(pred) == len(gold) == 2
        assert result["accuracy"][lang] == pytest.approx(100 * sum(p == g for p, g in zip(pred, gold)) / len(gold))
    assert result["accuracy"]["avg"] == pytest.approx(sum(result["accuracy"][lang] for lang in languages) / 15)


def test_xlmr_noise_reaches_the_encoder(xlmr_run):
    root, _ = xlmr_run
    assert kl_with_no_dropout(root, "xnli", "r3f", TINY_ROBERTA) > 0
