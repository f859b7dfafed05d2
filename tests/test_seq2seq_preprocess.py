"""seq2seq_preprocess: every release format on its fixture (tests/fixtures/seq2seq, each copying the real
release's layout and quirks), cross-format agreement, file:line errors and --skip-bad-rows, the binarized
output decoded back, atomic output, workers, the CLI and the dataset registry."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from seq2seq_preprocess import Seq2SeqFormatError, examples, get_dataset, preprocess, read_dataset
from seq2seq_preprocess.__main__ import main as cli_main
from seq2seq_preprocess.datasets.cnn_dm import fix_missing_period, parse_story, url_hash
from seq2seq_preprocess.datasets.reddit_tifu import seeded_split
from tests.test_glue_preprocess import make_tiny_gpt2

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "seq2seq"
XNLI_LANGUAGES = "ar bg de el en es fr hi ru sw th tr ur vi zh".split()


# ---------------------------------------------------------------------------------------------
# tiny stand-ins for BART's and XLM-R's tokenizer files (the real ones are downloads; see README)


def make_bart_files(folder: Path) -> dict:
    """The tiny GPT-2 BPE (test_glue_preprocess) + a BART-style dict.txt: one GPT-2 id per line."""
    encoder_json, vocab_bpe = make_tiny_gpt2(folder)
    n = len(json.loads(encoder_json.read_text()))
    (folder / "dict.txt").write_text("".join(f"{i} {1000 - i}\n" for i in range(n)))
    return {
        "tokenizer": "gpt2",
        "gpt2_encoder_json": str(encoder_json),
        "gpt2_vocab_bpe": str(vocab_bpe),
        "srcdict": str(folder / "dict.txt"),
    }


def make_xlmr_files(folder: Path) -> dict:
    """A tiny sentencepiece model trained on the XNLI fixture text + an XLM-R-style dict.txt (its pieces in
    model order without <unk>, <s>, </s>, which fairseq's own specials replace)."""
    import sentencepiece as spm

    from glue_preprocess.tokenization import train_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for path in sorted((FIXTURES / "xnli").rglob("*.tsv")):
        for row in csv.reader(path.open(encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE):
            texts += row[-3:-1] if len(row) > 3 else row[:2]
    model = train_sentencepiece(texts, folder / "spm", vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    (folder / "dict.txt").write_text("".join(f"{p} 1\n" for p in pieces if p not in ("<unk>", "<s>", "</s>")))
    return {"tokenizer": "sentencepiece", "sentencepiece_model": str(model), "srcdict": str(folder / "dict.txt")}


@pytest.fixture(scope="module")
def bart_files(tmp_path_factory):
    return make_bart_files(tmp_path_factory.mktemp("bart"))


def _split_texts(data):
    return {name: [(ex.texts, ex.target) for ex in d.examples] for name, d in data.items()}


# ---------------------------------------------------------------------------------------------
# CNN / DailyMail


def test_cnn_dm_story_parsing_follows_the_reference_parsers():
    assert url_hash(
        "http://web.archive.org/web/20150401100102id_/http://www.cnn.com/2015/04/01/europe/"
        "france-germanwings-plane-crash-main/"
    ) == ("469c6ac05092ca5997728c9dfc19f9ab6b936e40")  # datasets.md §1b test vector (first line of all_test.txt)
    assert fix_missing_period("No period") == "No period ." and fix_missing_period("Ends \u201cquoted\u201d") == (
        "Ends \u201cquoted\u201d"
    )
    article, highlights = parse_story("Para one\n\n@highlight\n\nFirst\n\nlate text\n@highlight\n\nSecond!\n")
    assert article == ["Para one ."] and highlights == ["First .", "late text .", "Second!"]  # flag never resets


def test_cnn_dm_stories_rows_drops_and_crlf():
    spec, fmt, data = read_dataset("cnn_dm", FIXTURES / "cnn_dm" / "stories")
    assert spec.name == "cnn_dm" and fmt == "stories"
    train = data["train"]
    assert [len(data[s].examples) for s in ("train", "valid", "test")] == [3, 1, 1]
    assert train.rows_read == 4 and train.dropped == {"empty article": 1}  # the 114-empty-stories quirk
    first = train.examples[0]
    assert first.texts[0].startswith("SMALLTOWN, Ohio (CNN) -- A town council") and first.texts[0].endswith("said.")
    assert (
        first.target
        == "Council renames main square after retired teacher . Campaign by former pupils lasted two years ."
    )
    assert first.ref == first.target.replace(" . ", " .\n")  # sentence per line for rougeLsum
    assert (
        train.examples[1].texts[0] == "LONDON, England (CNN) -- A striker who went missing for a week is back at his "
        "club. The club said he had been visiting family and apologised to fans."
    )  # the CRLF story
    assert data["test"].examples[0].id == "469c6ac05092ca5997728c9dfc19f9ab6b936e40"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "source_target"])
def test_cnn_dm_every_format_gives_the_stories_rows(fmt):
    """Four downloads of one release: HF export, Kaggle CSV (quoted multi-line fields), BART's files."""
    _, detected, data = read_dataset("cnn_dm", FIXTURES / "cnn_dm" / fmt)
    _, _, stories = read_dataset("cnn_dm", FIXTURES / "cnn_dm" / "stories")
    assert detected == fmt
    assert _split_texts(data) == _split_texts(stories)
    if fmt == "source_target":  # BART's files keep the empty-article story as an empty line
        assert data["train"].dropped == {"empty article": 1}
    else:
        assert data["train"].examples[0].ref == stories["train"].examples[0].ref


def test_cnn_dm_missing_story_names_the_url_list_line(tmp_path):
    root = tmp_path / "cnn"
    shutil.copytree(FIXTURES / "cnn_dm" / "stories", root)
    url = (root / "url_lists" / "all_train.txt").read_text().splitlines()[1]
    (root / "cnn" / "stories" / f"{hashlib.sha1(url.encode()).hexdigest()}.story").unlink()
    with pytest.raises(Seq2SeqFormatError, match=r"all_train.txt:2: no story file [0-9a-f]{40}\.story"):
        read_dataset("cnn_dm", root)
    _, _, data = read_dataset("cnn_dm", root, skip_bad_rows=True)
    assert len(data["train"].examples) == 2 and data["train"].skipped[0].startswith(
        f"{root}/url_lists/all_train.txt:2:"
    )


# ---------------------------------------------------------------------------------------------
# XSum, Gigaword, Reddit TIFU, WikiLingua


def test_xsum_official_split_and_boilerplate():
    _, fmt, data = read_dataset("xsum", FIXTURES / "xsum" / "summary")
    assert fmt == "summary"
    assert [ex.id for ex in data["train"].examples] == ["29750031", "28381580"]  # the split file's order
    assert [ex.id for ex in data["test"].examples] == ["40453444", "36000053"]
    pier = data["train"].examples[0]
    assert pier.target == "A Victorian pier closed for two years after storm damage has reopened to visitors."
    assert pier.texts[0] == (
        "The structure was shut after high winds tore away part of its deck. "
        "Repair work cost about \u00a33m, the local council said."
    )  # "Share this with", "Email", "Facebook" dropped, the pound sign kept
    _, _, jsonl = read_dataset("xsum", FIXTURES / "xsum" / "jsonl")
    assert _split_texts(jsonl) == _split_texts(data)


def test_xsum_missing_summary_file(tmp_path):
    root = tmp_path / "xsum"
    shutil.copytree(FIXTURES / "xsum" / "summary", root)
    (root / "bbc-summary-data" / "36000053.summary").unlink()
    with pytest.raises(Seq2SeqFormatError, match=r"SPLIT-90-5-5.json: test\[1\]: id '36000053' has no file"):
        read_dataset("xsum", root)
    (root / "bbc-summary-data" / "40453444.summary").write_text("[SN]URL[SN]\nhttp://x\n")
    with pytest.raises(Seq2SeqFormatError, match=r"40453444.summary:1: no \[SN\]FIRST-SENTENCE\[SN\] section"):
        read_dataset("xsum", root)


def test_gigaword_unk_quirk_and_alignment(tmp_path):
    _, _, data = read_dataset("gigaword", FIXTURES / "gigaword" / "src_tgt")
    train, test = data["train"], data["test"]
    assert train.changed == {"<unk> -> UNK": 3} and "changed" not in test.info() or test.changed == {}
    assert "for UNK relief" in train.examples[0].texts[0] and train.examples[3].target.startswith("UNK shares")
    assert test.examples[1].target == "UNK"  # test lines that are just UNK stay
    assert all("<unk>" not in ex.texts[0] + ex.target for d in data.values() for ex in d.examples)
    root = tmp_path / "giga"
    shutil.copytree(FIXTURES / "gigaword" / "src_tgt", root)
    tgt = root / "org_data" / "train.tgt.txt"
    tgt.write_text("\n".join(tgt.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(Seq2SeqFormatError, match=r"train.tgt.txt:4: file ends after 3 lines but .*train.src.txt has 4"):
        read_dataset("gigaword", root)


def test_gigaword_carriage_return_inside_a_line_keeps_alignment(tmp_path):
    """fairseq #1423: Python's text mode splits on a stray \\r and shifts source/target pairs."""
    root = tmp_path / "org_data"
    root.mkdir()
    (root / "train.src.txt").write_bytes(b"first line\rwith cr\nsecond\n")
    (root / "train.tgt.txt").write_bytes(b"t1\nt2\n")
    _, _, data = read_dataset("gigaword", tmp_path)
    assert [(ex.texts[0], ex.target) for ex in data["train"].examples] == [
        ("first line\rwith cr", "t1"),
        ("second", "t2"),
    ]


def test_reddit_tifu_long_filter_and_seeded_split():
    _, fmt, data = read_dataset("reddit_tifu", FIXTURES / "reddit_tifu" / "raw")
    assert fmt == "raw"
    assert data["train"].dropped == {"no tldr": 1, "empty document": 1}  # tldr null; empty selftext
    kept = [ex for s in ("train", "valid", "test") for ex in data[s].examples]
    assert [len(data[s].examples) for s in ("train", "valid", "test")] == [8, 1, 1]
    assert len({ex.where for ex in kept}) == 10  # every kept row in exactly one split
    assert kept[0].texts[0] == (
        "so this happened last night. i was trying to fix the kitchen tap myself and turned the wrong valve."
    )  # the post's line break folded
    assert seeded_split(100, 1) == seeded_split(100, 1) != seeded_split(100, 2)
    assert [len(v) for v in seeded_split(42139, 1).values()] == [33711, 4214, 4214]  # PEGASUS's sizes
    _, _, other = read_dataset("reddit_tifu", FIXTURES / "reddit_tifu" / "raw", seed=2)
    assert _split_texts(other) != _split_texts(data)


def test_wikilingua_gem_files():
    _, _, data = read_dataset("wiki_lingua_english_en", FIXTURES / "wikilingua" / "gem")  # HD's task name
    assert [len(data[s].examples) for s in ("train", "valid", "test")] == [2, 1, 1]
    assert data["valid"].examples[0].target == "Measure the wall."


# ---------------------------------------------------------------------------------------------
# XNLI


def test_xnli_zero_shot_splits_and_quirks():
    spec, _, data = read_dataset("xnli", FIXTURES / "xnli")
    assert spec.labels == ("entailment", "neutral", "contradiction")
    assert list(data)[:2] == ["train", "valid"]
    assert {f"test_{lang}" for lang in XNLI_LANGUAGES} <= set(data) and len(data) == 2 + 2 * 15
    train = data["train"].examples
    assert [ex.target for ex in train].count("contradiction") == 2  # XNLI-MT's "contradictory"
    assert train[3].texts[0] == 'two dogs run in a " park " .'  # QUOTE_NONE: quotes are text
    # independent: csv with QUOTE_NONE over the test file, grouped by language
    with open(FIXTURES / "xnli" / "XNLI-1.0" / "xnli.test.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for lang in XNLI_LANGUAGES:
        expected = [((r["sentence1"], r["sentence2"]), r["gold_label"]) for r in rows if r["language"] == lang]
        assert [(ex.texts, ex.target) for ex in data[f"test_{lang}"].examples] == expected
    assert data["valid"].examples[0].group == "en"
    _, _, two = read_dataset("xnli", FIXTURES / "xnli", languages=("fr",))
    assert set(two) == {"train", "valid", "valid_en", "valid_fr", "test_en", "test_fr"}  # en: model selection


def test_xnli_bad_label_and_language(tmp_path):
    root = tmp_path / "xnli"
    shutil.copytree(FIXTURES / "xnli", root)
    path = root / "XNLI-1.0" / "xnli.test.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].replace("\tcontradiction\t", "\tcontradicts\t", 1)
    lines[5] = "xx" + lines[5][2:]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Seq2SeqFormatError, match=r"xnli.test.tsv:4: unknown label 'contradicts'"):
        read_dataset("xnli", root)
    _, _, data = read_dataset("xnli", root, skip_bad_rows=True)
    skipped = [s for d in data.values() for s in d.skipped]
    assert len(skipped) == 2 and any(":6: unknown language 'xx'" in s for s in skipped)
    with pytest.raises(ValueError, match="--languages: unknown XNLI language"):
        read_dataset("xnli", root, languages=("klingon",))


# ---------------------------------------------------------------------------------------------
# generic readers: bad rows, detection, flags


def test_bad_jsonl_row_and_skip(tmp_path):
    root = tmp_path / "cnn"
    shutil.copytree(FIXTURES / "cnn_dm" / "jsonl", root)
    path = root / "train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(1, '{"article": "truncated')
    lines.append('{"article": "no highlights field"}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Seq2SeqFormatError, match=r"train.jsonl:2: not valid JSON"):
        read_dataset("cnn_dm", root)
    _, _, data = read_dataset("cnn_dm", root, skip_bad_rows=True)
    assert len(data["train"].examples) == 3 and len(data["train"].skipped) == 2
    assert "train.jsonl:5: missing field 'highlights'" in data["train"].skipped[1]


def test_not_utf8_names_the_line(tmp_path):
    (tmp_path / "train.source").write_bytes(b"ok\ncaf\xe9\n")
    (tmp_path / "train.target").write_text("a\nb\n")
    with pytest.raises(Seq2SeqFormatError, match=r"train.source:2: not valid UTF-8"):
        read_dataset("cnn_dm", tmp_path)


def test_unknown_dataset_format_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="--dataset 'cnn' is unknown; known: .*cnn_dm"):
        get_dataset("cnn")
    with pytest.raises(ValueError, match="no xsum release found there"):
        read_dataset("xsum", tmp_path)
    with pytest.raises(ValueError, match="--format 'parquet' is not a format of xsum"):
        read_dataset("xsum", FIXTURES / "xsum" / "jsonl", format="parquet")
    assert get_dataset("CNN_DailyMail").name == "cnn_dm"
    assert [ex.target for ex in examples("xsum", FIXTURES / "xsum" / "jsonl", "valid")] == [
        "Repairs to a historic bridge will take longer than planned, engineers have said."
    ]


# ---------------------------------------------------------------------------------------------
# binarized output


def _decode(prefix: Path, dict_path: Path) -> list[list[str]]:
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(dict_path))
    ds = data_utils.load_indexed_dataset(str(prefix), d)
    return [[d[int(i)] for i in ds[k]] for k in range(len(ds))]


def test_summarization_output_decodes_to_the_text(tmp_path, bart_files):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    summary = preprocess("xsum", FIXTURES / "xsum" / "summary", tmp_path, log=lambda s: None, **bart_files)
    out = tmp_path / "xsum-bin"
    assert summary["layout"] == {"task": "translation", "source_lang": "source", "target_lang": "target"}
    assert summary["generation"]["beam"] == 6 and summary["generation"]["min_len"] == 10  # XSUM_KWARGS
    assert (out / "dict.source.txt").read_text() == Path(bart_files["srcdict"]).read_text()
    bpe = get_encoder(bart_files["gpt2_encoder_json"], bart_files["gpt2_vocab_bpe"])
    rows = examples("xsum", FIXTURES / "xsum" / "summary", "test")
    for lang, texts in (("source", [ex.texts[0] for ex in rows]), ("target", [ex.target for ex in rows])):
        decoded = _decode(out / f"test.source-target.{lang}", out / f"dict.{lang}.txt")
        assert [bpe.decode([int(t) for t in ids[:-1]]) for ids in decoded] == texts
        assert all(ids[-1] == "</s>" for ids in decoded)
    refs = [json.loads(line) for line in (out / "test.ref.jsonl").read_text().splitlines()]
    assert refs == [{"id": ex.id, "ref": ex.target} for ex in rows]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["splits"]["train"]["rows_written"] == 2 and saved["binarized"]["test.source"]["unk_replaced"] == 0


def _all_fixture_texts() -> list[str]:
    texts = []
    for name in ("cnn_dm/stories", "xsum/summary", "gigaword/src_tgt", "reddit_tifu/raw", "wikilingua/gem", "xnli"):
        _, _, data = read_dataset(name.split("/")[0], FIXTURES / name)
        texts += [t for d in data.values() for ex in d.examples for t in (*ex.texts, ex.target)]
    return texts + ["", "  two  spaces\tand tab ", "'s 've 12,345 \u00e9t\u00e9 \U0001f600"]


@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece"])
def test_fast_binarizer_writes_fairseqs_bytes(tmp_path, bart_files, kind, monkeypatch):
    """fast_binarize (tokenizer ids -> dictionary in numpy) against fairseq's path: token lines from the
    tokenizer of glue_preprocess (fairseq's own gpt2_bpe_utils.Encoder / sentencepiece pieces), then
    fairseq's FileBinarizer with the same dictionary."""
    from fairseq.data import Dictionary

    from glue_preprocess.core import binarize
    from glue_preprocess.tokenization import TokenizerSpec
    from seq2seq_preprocess import fast_binarize

    files = bart_files if kind == "gpt2" else make_xlmr_files(tmp_path / "xlmr")
    spec = TokenizerSpec(kind, **{k: v for k, v in files.items() if k not in ("tokenizer", "srcdict")})
    dictionary = Dictionary.load(files["srcdict"])
    texts = _all_fixture_texts()
    (tmp_path / "tokens").write_text("".join(line + "\n" for line in spec.build().encode_batch(texts)))
    slow = binarize(tmp_path / "tokens", dictionary, tmp_path / "slow", 1)
    monkeypatch.setattr(fast_binarize, "CHUNK", 16)  # many chunks over 2 forked workers: order must hold
    with fast_binarize.FastBinarizer(spec, dictionary, workers=2) as binarizer:
        fast = binarizer.binarize(texts, tmp_path / "fast")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"fast.{ext}").read_bytes() == (tmp_path / f"slow.{ext}").read_bytes()
    assert fast == slow


def test_classification_output_and_label_order(tmp_path):
    files = make_xlmr_files(tmp_path / "xlmr")
    preprocess("xnli", FIXTURES / "xnli", tmp_path, languages="fr,zh", log=lambda s: None, **files)
    out = tmp_path / "xnli-bin"
    assert sorted(p.name for p in out.iterdir()) == ["input0", "input1", "label", "summary.json"]
    labels = (out / "label" / "dict.txt").read_text().split("\n")[:3]
    assert [line.split()[0] for line in labels] == ["entailment", "neutral", "contradiction"]
    assert [line.split()[1] for line in labels] == ["2", "2", "2"]  # train counts
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=files["sentencepiece_model"])
    rows = examples("xnli", FIXTURES / "xnli", "test_zh")
    decoded = _decode(out / "input1" / "test_zh", out / "input0" / "dict.txt")
    assert [sp.decode(ids[:-1]) for ids in decoded] == [ex.texts[1] for ex in rows]
    assert [g for ids in _decode(out / "label" / "test_zh", out / "label" / "dict.txt") for g in ids[:-1]] == [
        ex.target for ex in rows
    ]


def test_workers_give_identical_output_and_output_is_atomic(tmp_path, bart_files, monkeypatch):
    root = FIXTURES / "cnn_dm" / "csv"
    preprocess("cnn_dm", root, tmp_path / "w1", log=lambda s: None, **bart_files)
    preprocess("cnn_dm", root, tmp_path / "w2", workers=2, log=lambda s: None, **bart_files)
    for path in (tmp_path / "w1" / "cnn_dm-bin").glob("*.bin"):
        assert path.read_bytes() == (tmp_path / "w2" / "cnn_dm-bin" / path.name).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess("cnn_dm", root, tmp_path / "w1", log=lambda s: None, **bart_files)

    import seq2seq_preprocess.core as core

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(core.FastBinarizer, "binarize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess("cnn_dm", root, tmp_path / "w3", log=lambda s: None, **bart_files)
    assert list((tmp_path / "w3").iterdir()) == []  # no half-written cnn_dm-bin, no temp dir left


def test_cli_exit_codes_and_skip(tmp_path, bart_files, capsys):
    root = tmp_path / "giga"
    shutil.copytree(FIXTURES / "cnn_dm" / "jsonl", root)
    with open(root / "train.jsonl", "a", encoding="utf-8") as f:
        f.write("[1, 2]\n")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in bart_files.items()]
    argv = ["--dataset", "cnn_dm", "--input-dir", str(root), "--output-dir", str(tmp_path / "out"), *flags]
    assert cli_main(argv) == 2
    assert "train.jsonl:4: expected a JSON object, got list" in capsys.readouterr().err
    assert cli_main([*argv, "--skip-bad-rows", "--max-rows", "2"]) == 0
    saved = json.loads((tmp_path / "out" / "cnn_dm-bin" / "summary.json").read_text())
    assert saved["splits"]["train"]["rows_skipped"] == 1 and saved["splits"]["train"]["rows_written"] == 2
    assert cli_main([*argv, "--skip-bad-rows", "--splits", "train,dev"]) == 2
    assert "--splits dev: not in this release" in capsys.readouterr().err


def test_registry_takes_a_new_dataset_in_one_call():
    from seq2seq_preprocess import registry
    from seq2seq_preprocess.registry import Dataset, Format, register

    fmt = Format("lines", "x.txt", lambda root: True, lambda root, options: {})
    try:
        register(Dataset("toy_task", "summarization", (fmt,), "nowhere", "a test dataset", aliases=("toy",)))
        assert get_dataset("toy").name == "toy_task" and "toy_task" in registry.all_datasets()
        with pytest.raises(ValueError, match="registered twice"):
            register(Dataset("other", "summarization", (fmt,), "", "", aliases=("toy",)))
        with pytest.raises(ValueError, match="kind must be one of"):
            register(Dataset("bad", "ranking", (fmt,), "", ""))
    finally:
        for key in ("toy_task", "toy"):
            registry._DATASETS.pop(key, None)


def test_gpt2_word_cache_equals_fairsegs_encoder_on_random_text(bart_files):
    """IdEncoder._gpt2 caches ids per space-separated word; on any text it must equal fairseq's Encoder.encode
    (random strings over letters, digits, contractions, punctuation, non-ASCII and every kind of whitespace)."""
    import random

    from glue_preprocess.tokenization import TokenizerSpec
    from seq2seq_preprocess.fast_binarize import IdEncoder

    spec = TokenizerSpec(
        "gpt2", gpt2_encoder_json=bart_files["gpt2_encoder_json"], gpt2_vocab_bpe=bart_files["gpt2_vocab_bpe"]
    )
    encoder = IdEncoder(spec)
    rng = random.Random(0)
    alphabet = [*"abcXYZ019'.,-!?\"()$", "'s", "'t", "'re", "\u00e9", "\u00df", "\u4e2d", "\U0001f600"]
    alphabet += ["\u00a0", "\t", "\n", "  ", "\u2009", "\x1c", *[" "] * 6]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert encoder._gpt2(text) == encoder.bpe.encode(text), repr(text)
    assert len(encoder.space_cache) > 100  # the cached path ran
