"""Evaluation and recipes of R3F beyond GLUE (issue 16): ROUGE against hand-computed examples, the sentence
split of ROUGE-Lsum, the report next to the paper's numbers, and scripts/recipes/seq2seq.sh's flags (parsed by
fairseq) and refusals. The end-to-end runs are in tests/test_seq2seq_e2e.py."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from fairseq import options

from robustft_common import methods
from robustft_experiments import seq2seq_eval
from robustft_experiments.seq2seq_eval import rouge, split_sentences
from seq2seq_preprocess import get_dataset
from tests.fairseq_helpers import REPO

RECIPE = REPO / "scripts" / "recipes" / "seq2seq.sh"


# ---------------------------------------------------------------------------------------------- ROUGE
def test_rouge_hand_computed_single_sentence():
    """ref "the cat sat on the mat", hyp "the cat lay on the mat" (6 tokens each, no token > 3 chars stems):
    unigram overlap the, the, cat, on, mat = 5 -> P = R = F = 5/6; bigrams (the cat)(on the)(the mat) = 3 of 5
    -> 3/5; LCS "the cat on the mat" = 5 -> 5/6; one sentence, so Lsum = L."""
    scores = rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6) and scores["rougeLsum"] == scores["rougeL"]


def test_rouge_stemming_case_punctuation_and_lsum():
    """Tokenizer: lowercase, non-alphanumerics dropped, Porter stem of tokens > 3 chars ("Running" -> "run",
    "runs" -> "run"). ROUGE-Lsum unites per-sentence LCS: ref sentences "a b c d" / "e f g h", hyp one sentence
    "e f g h a b c d": whole-text LCS 4 of 8 (L = 0.5), union LCS of each ref sentence = 4 + 4 (Lsum = 1.0)."""
    scores = rouge(["Running FAST!"], ["runs fast."])
    assert scores["rouge1"] == pytest.approx(100.0) and scores["rouge2"] == pytest.approx(100.0)
    scores = rouge(["e f g h a b c d"], ["a b c d.\ne f g h."])
    assert scores["rougeL"] == pytest.approx(50.0) and scores["rougeLsum"] == pytest.approx(100.0)
    # mean over examples: (100 + 0) / 2
    assert rouge(["x y", "p q"], ["x y", "u v"])["rouge1"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        rouge(["a", "b"], ["a"])


def test_sentence_split_for_rougelsum():
    assert split_sentences("One. Two! Three? four") == "One.\nTwo!\nThree?\nfour"
    assert split_sentences("Costs 3.5 m. now") == "Costs 3.5 m.\nnow"  # 3.5 stays; an abbreviation splits
    assert split_sentences("Costs 3.5m") == "Costs 3.5m"
    assert split_sentences(" Given .\nbreaks . ") == "Given .\nbreaks ."  # the reference's own lines win


# ---------------------------------------------------------------------------------------------- report
def test_report_puts_ours_next_to_the_paper():
    runs = [
        {"dataset": "cnn_dm", "method": "r3f_seq2seq", "rouge": {"rouge1": 44.0, "rouge2": 21.0, "rougeLsum": 41.0}},
        {"dataset": "cnn_dm", "method": "r3f_seq2seq", "rouge": {"rouge1": 45.0, "rouge2": 22.0, "rougeLsum": 40.0}},
        {"dataset": "xnli", "method": "r4f", "accuracy": {"en": 90.0, "fr": 80.0, "avg": 85.0}},
    ]
    text = seq2seq_eval.report(runs)
    paper = json.loads(seq2seq_eval.PAPER_NUMBERS.read_text())
    row = next(r for r in paper["summarization"]["rows"] if r["dataset"] == "cnn_dm" and r["method"] == "BART+R3F")
    assert f"| cnn_dm | paper: BART+R3F | {row['rouge1']:.2f} | {row['rouge2']:.2f} | {row['rougeL']:.2f} |" in text
    assert "| cnn_dm | ours: r3f_seq2seq | 44.50 ± 0.71 (n=2) | 21.50 ± 0.71 (n=2) | 40.50 ± 0.71 (n=2) |" in text
    assert "| paper: XLM-R+R4F | – | – | – | – | 89.6 |" in text and "| 81.4 |" in text
    assert "| ours: r4f | – | – | – | – | 90.00 | – | 80.00 |" in text


def test_paper_numbers_match_the_reference():
    """R3F Table 4 / Table 3 as shared/reference/r3f.md §4 lists them."""
    paper = json.loads(seq2seq_eval.PAPER_NUMBERS.read_text())
    r3f = {r["dataset"]: r for r in paper["summarization"]["rows"] if r["method"] == "BART+R3F"}
    assert [r3f[d][k] for d in ("cnn_dm", "gigaword", "reddit_tifu") for k in ("rouge1", "rouge2", "rougeL")] == [
        44.38,
        21.53,
        41.17,
        40.45,
        20.69,
        36.56,
        30.31,
        10.98,
        24.74,
    ]
    assert [(r["en"], r["avg"]) for r in paper["xnli"]["rows"]] == [(89.1, 80.9), (89.4, 81.2), (89.6, 81.4)]


# ---------------------------------------------------------------------------------------------- recipes
def dry_run(dataset: str, method: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, DATA_ROOT="/data", MODEL_PATH="/models/model.pt", DRY_RUN="1", PY=sys.executable)
    full.update(METHOD_TEXT=methods._bash(method), **env)
    return subprocess.run(["bash", str(RECIPE), dataset, method, "3"], capture_output=True, text=True, env=full)


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    "dataset, updates, update_freq", [("cnn_dm", "20000", "4"), ("xsum", "15000", "2"), ("reddit_tifu", "20000", "4")]
)
def test_summarization_recipe_is_barts_with_the_registry_method(dataset, updates, update_freq):
    proc = dry_run(dataset, "r3f_seq2seq")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    flags = methods.method_flags("r3f_seq2seq")
    start = argv.index("--criterion")
    assert argv[start : start + len(flags)] == flags  # the registry's flags, in order
    assert argv[0] == f"/data/{dataset}-bin" and _flag(argv, "--arch") == "bart_large"
    assert _flag(argv, "--max-update") == updates and _flag(argv, "--update-freq") == update_freq
    assert (_flag(argv, "--lr"), _flag(argv, "--warmup-updates"), _flag(argv, "--max-tokens")) == (
        "3e-05",
        "500",
        "2048",
    )
    assert {"--fp16", "--truncate-source", "--share-all-embeddings"} <= set(argv)
    assert _flag(argv, "--save-dir").endswith(f"{dataset}/r3f_seq2seq/seed3")
    # fairseq accepts them (the plugin registers the criterion)
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    assert args.criterion == "label_smoothed_cross_entropy_r3f" and args.r3f_kl_norm == "sentence"
    twin = shlex.split(dry_run(dataset, "vanilla_seq2seq").stdout)
    assert _flag(twin, "--criterion") == "label_smoothed_cross_entropy"
    strip = lambda a: [x for x in a if x not in flags and x not in methods.method_flags("vanilla_seq2seq")]  # noqa: E731
    assert strip(twin)[: strip(twin).index("--save-dir")] == strip(argv)[: strip(argv).index("--save-dir")]


def test_xnli_recipe_and_refusals():
    argv = shlex.split(dry_run("xnli", "r4f").stdout)
    assert _flag(argv, "--task") == "sentence_prediction" and _flag(argv, "--num-classes") == "3"
    assert _flag(argv, "--valid-subset") == "valid" and "--spectral-norm-classification-head" in argv
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    assert args.arch == "roberta_large" and args.r4f_spectral_norm_dense
    wrong = dry_run("xnli", "r3f_seq2seq")
    assert wrong.returncode == 2 and "does not fit xnli" in wrong.stderr
    missing = dry_run("cnn_dm", "r3f_seq2seq", DRY_RUN="")
    assert missing.returncode == 2 and "MODEL_PATH /models/model.pt: no such file" in missing.stderr


def test_every_summarization_dataset_has_a_recipe_and_decoding_settings():
    for name in ("cnn_dm", "xsum", "gigaword", "reddit_tifu", "wikilingua"):
        assert get_dataset(name).generation is not None
        assert dry_run(name, "vanilla_seq2seq").returncode == 0
