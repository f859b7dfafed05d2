"""Issue 17 data preparation on fixtures in each release's real format (tests/fixtures/seq2seq/{mrqa,anli,art}):
MRQA context windows (answer placement over GPT-2 BPE offsets, unanswerable windows, stride), the binarized
MRQA folder decoded back, ANLI / ART readers and the reference's text-to-text casts, and the
summarisation + NLI mixture folder."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from seq2seq_preprocess import Seq2SeqFormatError, read_dataset
from seq2seq_preprocess.mixture import preprocess as build_mixture
from seq2seq_preprocess.mixture import seeded_subset
from seq2seq_preprocess.mrqa import Gpt2WithOffsets, WindowOptions, question_windows
from seq2seq_preprocess.mrqa import main as mrqa_main
from seq2seq_preprocess.mrqa import preprocess as build_mrqa
from seq2seq_preprocess.nli_text2text import cast_anli, cast_art, read_art
from seq2seq_preprocess.registry import ReadOptions
from tests.test_seq2seq_preprocess import make_bart_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "seq2seq"
MRQA = FIXTURES / "mrqa"
WINDOW = WindowOptions(window=160, stride=32, windows=True, max_question_tokens=32)  # ~3 windows on the fixture


@pytest.fixture(scope="module")
def bart_files(tmp_path_factory):
    return make_bart_files(tmp_path_factory.mktemp("bart"))


@pytest.fixture(scope="module")
def tok(bart_files):
    return Gpt2WithOffsets(bart_files["gpt2_encoder_json"], bart_files["gpt2_vocab_bpe"])


def gzipped_mrqa(root: Path) -> Path:
    """The fixture as the shared task ships it: train/ and dev/ with *.jsonl.gz."""
    for path in MRQA.rglob("*.jsonl"):
        dest = root / path.relative_to(MRQA).with_suffix(".jsonl.gz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(gzip.compress(path.read_bytes()))
    return root


def contexts(name: str) -> list[dict]:
    return [json.loads(line) for line in (MRQA / name).read_text().splitlines()[1:]]


def windows_of(tok, context: dict, question: int, opt=WINDOW):
    ids, offsets = tok.encode_with_offsets(" " + context["context"])
    offsets = [(max(s - 1, 0), e - 1) for s, e in offsets]
    return question_windows(tok, context["context"], ids, offsets, context["qas"][question], opt)


# ---------------------------------------------------------------------------------------------
# MRQA windows


def test_offsets_match_the_bpe_and_cover_multibyte_characters(tok):
    text = " The café's 1871 façade — rebuilt"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.bpe.encode(text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] <= b[0] or a == b or a[0] == b[0] for a, b in zip(offsets, offsets[1:]))  # in order
    for token, (start, end) in zip(ids, offsets):
        piece = tok.bpe.decode([token])
        if "\ufffd" not in piece:  # a whole-character token decodes to exactly its span
            assert text[start:end] == piece


def test_answer_only_in_a_later_window(tok):
    """The Ferrand question: the context needs three windows and only the last holds the answer span."""
    (orchard, _) = contexts("dev/SQuAD.jsonl")
    windows = windows_of(tok, orchard, 0)
    assert [w.target for w in windows] == ["", "", "Ferrand family"]
    assert all(w.count == 3 for w in windows) and [w.index for w in windows] == [0, 1, 2]
    assert all(len(w.source) <= WINDOW.window - 1 for w in windows)  # </s> is appended at binarization
    # the question prefix, then consecutive windows that share exactly `stride` context tokens
    ids, _ = tok.encode_with_offsets(" " + orchard["context"])
    prefix = tok.encode("question:") + tok.encode(" Which family founded the bakery?") + tok.encode(" context:")
    bodies = [w.source[len(prefix) :] for w in windows]
    assert all(w.source[: len(prefix)] == prefix for w in windows)
    width = WINDOW.window - len(prefix) - 1
    assert bodies[0] == ids[:width] and bodies[1][: WINDOW.stride] == bodies[0][-WINDOW.stride :]
    assert bodies[-1][-1] == ids[-1]  # the last window reaches the end of the context
    # with 200-token windows the context needs two, and the answer is only in the second
    two = windows_of(tok, orchard, 0, WindowOptions(200, 32, True, 32))
    assert [(w.target, w.count) for w in two] == [("", 2), ("Ferrand family", 2)]


def test_two_windows_two_answers_and_unanswerable_question(tok):
    (orchard, _) = contexts("dev/SQuAD.jsonl")
    # detected answers "old mill" (first window) and "lime trees" (second): each window its own span
    assert [w.target for w in windows_of(tok, orchard, 1)] == ["old mill", "lime trees", ""]
    # no detected answer in the context: every window's target is empty
    assert [w.target for w in windows_of(tok, orchard, 2)] == ["", "", ""]
    # windows off: only the first window
    single = windows_of(tok, orchard, 0, WindowOptions(160, 32, False, 32))
    assert [(w.target, w.count) for w in single] == [("", 1)]


def test_window_options_are_checked():
    with pytest.raises(ValueError, match="--window 100 leaves 28 context tokens"):
        WindowOptions(window=100, stride=64, max_question_tokens=64).validate()
    with pytest.raises(ValueError, match="--stride must be >= 0"):
        WindowOptions(stride=-1).validate()


def test_mrqa_folder_decodes_back(tmp_path, bart_files, tok):
    from fairseq.data import Dictionary, data_utils

    src = gzipped_mrqa(tmp_path / "mrqa")
    summary = build_mrqa(
        src, tmp_path / "out", **_bpe(bart_files), window=160, stride=32, max_question_tokens=32, log=lambda s: None
    )
    out = tmp_path / "out" / "mrqa-bin"
    assert summary["splits"]["valid_squad"]["questions"] == 4
    assert summary["splits"]["valid_squad"]["unanswerable_questions"] == 1
    assert summary["splits"]["valid_squad"]["windows"] == 3 + 3 + 3 + 1
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["datasets"] == {
        "SQuAD": {"key": "squad", "domain": "in", "split": "valid_squad"},
        "BioASQ": {"key": "bioasq", "domain": "out", "split": "test_bioasq"},
    }
    meta = [json.loads(line) for line in (out / "valid_squad.mrqa.jsonl").read_text().splitlines()]
    assert [(m["window"], m["windows"]) for m in meta[:3]] == [(0, 3), (1, 3), (2, 3)]
    assert meta[0]["answers"] == ["the Ferrand family", "Ferrand"] and meta[0]["dataset"] == "SQuAD"
    assert (out / "valid_squad.task").read_text() == "mrqa\n" * len(meta)
    d = Dictionary.load(str(out / "dict.source.txt"))
    sources = data_utils.load_indexed_dataset(str(out / "valid_squad.source-target.source"), d)
    targets = data_utils.load_indexed_dataset(str(out / "valid_squad.source-target.target"), d)

    def text(tensor):
        return tok.bpe.decode([int(t) for t in d.string(tensor).split()])

    assert text(sources[2]).startswith("question: Which family founded the bakery? context:")
    assert [text(targets[i]) for i in range(3)] == ["", "", "Ferrand family"]
    assert text(targets[3]) == "old mill" and text(targets[9]) == "Tomas Brel"
    bioasq = data_utils.load_indexed_dataset(str(out / "test_bioasq.source-target.target"), d)
    assert text(bioasq[0]) == "lactase"


def _bpe(files):
    return {k: files[k] for k in ("gpt2_encoder_json", "gpt2_vocab_bpe", "srcdict")} | {"datasets": "squad,bioasq"}


def test_mrqa_bad_rows_header_and_missing_file(tmp_path, bart_files, capsys):
    root = tmp_path / "mrqa"
    shutil.copytree(MRQA, root)
    lines = (root / "dev" / "SQuAD.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["qas"][0]["detected_answers"][0]["char_spans"] = [[90, 999]]
    (root / "dev" / "SQuAD.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    kwargs = _bpe(bart_files) | {"window": 160, "stride": 32, "max_question_tokens": 32, "log": lambda s: None}
    with pytest.raises(Seq2SeqFormatError, match=r"dev/SQuAD.jsonl:3: qas\[0\] \(.*\): char span \[90, 999\] outside"):
        build_mrqa(root, tmp_path / "out", **kwargs)
    summary = build_mrqa(root, tmp_path / "out", skip_bad_rows=True, **kwargs)
    assert summary["splits"]["valid_squad"]["skipped"] == 1 and summary["splits"]["valid_squad"]["questions"] == 3
    shutil.copy(root / "train" / "SQuAD.jsonl", root / "dev" / "BioASQ.jsonl")  # a train file in the dev folder
    with pytest.raises(Seq2SeqFormatError, match=r"dev/BioASQ.jsonl:1: header says split 'train', expected 'dev'"):
        build_mrqa(root, tmp_path / "out2", skip_bad_rows=True, **kwargs)
    argv = ["--input-dir", str(root), "--output-dir", str(tmp_path / "o3"), "--datasets", "race"]
    argv += ["--gpt2-encoder-json", bart_files["gpt2_encoder_json"], "--gpt2-vocab-bpe", bart_files["gpt2_vocab_bpe"]]
    assert mrqa_main(argv) == 2 and "RACE (dev): not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ANLI, ART and the reference's casts


def test_anli_rounds_labels_and_cast():
    _, fmt, data = read_dataset("anli", FIXTURES / "anli")
    assert fmt == "jsonl" and [len(data[s].examples) for s in ("train", "valid", "test")] == [5, 3, 3]
    first = data["train"].examples[0]
    assert first.group == "r1" and first.target == "entailment" and data["train"].examples[-1].group == "r3"
    assert cast_anli(first) == (
        "anli premise: The Harlow Bridge is a stone bridge over the river Tey, built in 1802. "
        "hypothesis: The bridge was built in the nineteenth century.",
        "0",
    )
    assert [cast_anli(ex)[1] for ex in data["train"].examples] == ["0", "2", "1", "2", "0"]  # e n c -> 0 1 2


def test_art_reader_and_cast(tmp_path):
    data = read_art(FIXTURES / "art", ReadOptions())
    assert [len(data[s].examples) for s in ("train", "valid")] == [4, 2] and "test" not in data
    assert cast_art(data["train"].examples[0]) == (
        "art observation 1: Maya planted tomatoes in spring. observation 2: By August she had more than she could "
        "eat. hypothesis 1: The plants died in a frost. hypothesis 2: The plants grew very well.",
        "2",
    )
    root = tmp_path / "art"
    shutil.copytree(FIXTURES / "art", root)
    (root / "dev-labels.lst").write_text("1\n")
    with pytest.raises(Seq2SeqFormatError, match="dev-labels.lst:2: 1 labels but .*dev.jsonl has 2 lines"):
        read_art(root, ReadOptions())
    (root / "dev-labels.lst").write_text("1\n3\n")
    with pytest.raises(Seq2SeqFormatError, match=r"dev-labels.lst:2: label '3' is not 1 or 2"):
        read_art(root, ReadOptions())


# ---------------------------------------------------------------------------------------------
# the summarisation + NLI mixture


def test_mixture_folder(tmp_path, bart_files):
    bpe = {k: bart_files[k] for k in ("gpt2_encoder_json", "gpt2_vocab_bpe", "srcdict")}
    build_mixture(
        tmp_path,
        **bpe,
        xsum=FIXTURES / "xsum" / "jsonl",
        anli=FIXTURES / "anli",
        art=FIXTURES / "art",
        n_val=2,
        art_valid_from_train=1,
        log=lambda s: None,
    )
    out = tmp_path / "mixture-bin"
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["format"] == "text2text_mixture" and list(tasks["tasks"]) == ["xsum", "anli", "art"]
    assert tasks["tasks"]["xsum"]["generation"]["beam"] == 6 and tasks["tasks"]["anli"]["labels"] == ["0", "1", "2"]
    assert tasks["tasks"]["art"]["valid_splits"] == ["valid_art"] and tasks["tasks"]["art"]["test_splits"] == [
        "test_art"
    ]
    train_tasks = (out / "train.task").read_text().split()
    _, _, xsum = read_dataset("xsum", FIXTURES / "xsum" / "jsonl")
    assert train_tasks == ["xsum"] * len(xsum["train"].examples) + ["anli"] * 5 + ["art"] * 3
    # dev subsample: the first n_val of a seed-42 randperm (the reference's get_shuffled_sampled_split)
    keep = sorted(torch.randperm(3, generator=torch.Generator().manual_seed(42))[:2].tolist())
    assert seeded_subset(3, 2) == keep
    refs = [json.loads(line)["ref"] for line in (out / "valid_anli.ref.jsonl").read_text().splitlines()]
    _, _, anli = read_dataset("anli", FIXTURES / "anli")
    assert refs == [cast_anli(anli["valid"].examples[i])[1] for i in keep]
    # ART: one train row carved as valid_art, its dev set is test_art
    assert (
        len((out / "valid_art.task").read_text().split()) == 1 and len((out / "test_art.task").read_text().split()) == 2
    )
    with pytest.raises(ValueError, match="give at least one task folder"):
        build_mixture(tmp_path / "x", **bpe)
