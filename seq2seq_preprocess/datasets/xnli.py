"""XNLI (Conneau et al. 2018), zero-shot cross-lingual transfer as in XLM-R / R3F Table 3: train on English
MNLI, select on English dev, test on the XNLI test set of each of the 15 languages (datasets.md §6).

Files: `XNLI-1.0/xnli.{dev,test}.tsv` (tab-separated with a header, no quoting: `"` is a plain character;
columns found by header name: language, gold_label, sentence1, sentence2, pairID) and the English MNLI
train set, either the XNLI-MT copy `XNLI-MT-1.0/multinli/multinli.train.en.tsv` (`premise hypo label`,
label `contradictory` meaning contradiction) or GLUE's `MNLI/train.tsv` (read by glue_preprocess).
Splits: train (MNLI en), valid (XNLI dev en), valid_<lang> and test_<lang> for each language.
"""

from __future__ import annotations

from pathlib import Path

from ..records import Example, Rows, SplitData, first_existing, iter_tsv, one_line
from ..registry import Dataset, Format, ReadOptions, register

LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
LABELS = ("entailment", "neutral", "contradiction")  # class ids 0, 1, 2 (HF xnli / glue MNLI order)
XNLI_FILES = {"dev": ("XNLI-1.0/xnli.dev.tsv", "xnli.dev.tsv"), "test": ("XNLI-1.0/xnli.test.tsv", "xnli.test.tsv")}
MT_TRAIN = ("XNLI-MT-1.0/multinli/multinli.train.en.tsv", "multinli/multinli.train.en.tsv", "multinli.train.en.tsv")
GLUE_MNLI_TRAIN = "MNLI/train.tsv"
MT_LABELS = {"contradictory": "contradiction", "entailment": "entailment", "neutral": "neutral"}


def _example(rows: Rows, where: str, premise: str, hypothesis: str, label: str, lang: str, pair_id: str = ""):
    premise, hypothesis = one_line(premise), one_line(hypothesis)
    if label not in LABELS:
        rows.bad(where, f"unknown label {label!r} (expected one of {', '.join(LABELS)})")
    elif not premise or not hypothesis:
        rows.bad(where, "empty premise or hypothesis")
    else:
        rows.add(Example((premise, hypothesis), label, where, pair_id, group=lang))


def _read_mnli_train(root: Path, options: ReadOptions) -> SplitData:
    rows = Rows("train", options.skip_bad_rows)
    mt = first_existing(root, MT_TRAIN)
    if mt is not None:
        for where, rec in iter_tsv(mt, rows, ("premise", "hypo", "label")):
            label = MT_LABELS.get(rec["label"].strip(), rec["label"].strip())
            _example(rows, where, rec["premise"], rec["hypo"], label, "en")
        return rows.data
    from glue_preprocess.tasks import GlueFormatError, parse_file, resolve_task, split_files

    spec = resolve_task("MNLI")
    (path, layout), *_ = split_files(root, spec, "train")
    try:
        parsed = parse_file(path, spec, layout, options.skip_bad_rows)
    except GlueFormatError as e:
        from ..records import Seq2SeqFormatError

        raise Seq2SeqFormatError(str(e)) from None
    rows.read_file(path)
    rows.data.rows_read, rows.data.skipped = parsed.rows_read, list(parsed.skipped)
    for ex in parsed.examples:
        _example(rows, f"{path}:{ex.line}", ex.texts[0], ex.texts[1], ex.label, "en")
    return rows.data


def _read_xnli_file(path: Path, kind: str, options: ReadOptions, languages: tuple[str, ...]) -> dict[str, SplitData]:
    """{"valid_<lang>" or "test_<lang>": SplitData} of one xnli.dev.tsv / xnli.test.tsv. A row with an unknown
    language is reported with the first language's split (it belongs to none)."""
    rows = Rows(kind, options.skip_bad_rows)
    read = {lang: 0 for lang in LANGUAGES}
    skipped: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    for where, rec in iter_tsv(path, rows, ("language", "gold_label", "sentence1", "sentence2", "pairID")):
        lang = rec["language"].strip()
        n_bad = len(rows.data.skipped)
        if lang not in LANGUAGES:
            rows.bad(where, f"unknown language {lang!r} (expected one of {' '.join(LANGUAGES)})")
            lang = languages[0]
        else:
            read[lang] += 1
            _example(rows, where, rec["sentence1"], rec["sentence2"], rec["gold_label"].strip(), lang, rec["pairID"])
        skipped[lang] += rows.data.skipped[n_bad:]
    prefix = "valid" if kind == "dev" else "test"
    out = {}
    for lang in languages:
        name = f"{prefix}_{lang}"
        examples = [ex for ex in rows.data.examples if ex.group == lang]
        out[name] = SplitData(name, examples, files=[str(path)], rows_read=read[lang], skipped=skipped[lang])
    return out


def _read(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    languages = tuple(options.languages) or LANGUAGES
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"--languages: unknown XNLI language(s) {unknown}; known: {','.join(LANGUAGES)}")
    if "en" not in languages:
        languages = ("en", *languages)  # English dev is the zero-shot model-selection split
    out = {"train": _read_mnli_train(root, options)}
    files = {kind: first_existing(root, names) for kind, names in XNLI_FILES.items()}
    per_kind = {kind: _read_xnli_file(path, kind, options, languages) for kind, path in files.items() if path}
    if "dev" in per_kind:
        english_dev = per_kind["dev"]["valid_en"]
        out["valid"] = SplitData("valid", list(english_dev.examples), files=list(english_dev.files))
    for splits in per_kind.values():
        out.update(splits)
    return out


def _detect(root: Path) -> bool:
    has_train = first_existing(root, MT_TRAIN) is not None or (root / GLUE_MNLI_TRAIN).is_file()
    return has_train and first_existing(root, XNLI_FILES["test"]) is not None


register(
    Dataset(
        name="xnli",
        kind="classification",
        formats=(
            Format(
                "xnli",
                "XNLI-1.0/xnli.{dev,test}.tsv + MNLI train (XNLI-MT-1.0/multinli/multinli.train.en.tsv|MNLI/train.tsv)",
                _detect,
                _read,
            ),
        ),
        download=(
            "https://dl.fbaipublicfiles.com/XNLI/XNLI-1.0.zip (dev/test) and XNLI-MT-1.0.zip (multinli.train.en.tsv); "
            "or GLUE's MNLI (python -m glue_preprocess's download) for MNLI/train.tsv"
        ),
        description="XNLI zero-shot: MNLI en train, 15-language dev (2,490 each) / test (5,010 each)",
        labels=LABELS,
        extra={"languages": LANGUAGES},
    )
)
