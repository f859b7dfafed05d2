"""GLUE task layouts and a strict tsv parser (tab-split, no quote handling = csv.QUOTE_NONE)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


class GlueFormatError(ValueError):
    """A malformed GLUE row or file; the message starts with `file:line:`."""


@dataclass(frozen=True)
class FileLayout:
    """Columns of one GLUE file: `header` None = no header row; negative indices count from the end."""

    n_columns: int
    text_columns: tuple
    label_column: int | None = None
    header: tuple | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str  # GLUE folder name
    t2t_name: str  # lowercase HF-style name used by the text2text format
    fields: tuple  # text2text field names, one per text column
    labels: tuple | None  # label strings in class-id order; None = regression (STS-B)
    label_words: tuple | None  # text2text target word per class id
    metrics: tuple
    # split name -> list of (file name, layout) in fairseq order (valid, valid1, ...)
    files: dict = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def n_inputs(self) -> int:
        return len(self.fields)


def _tsv(*names):
    return tuple(names)


_MNLI_TRAIN_HEADER = _tsv(
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
)
_MNLI_DEV_HEADER = _MNLI_TRAIN_HEADER[:-1] + ("label2", "label3", "label4", "label5", "gold_label")
_STSB_HEADER = _tsv(
    "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"
)
_MRPC_HEADER = _tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")


def _pair_task(name, t2t, fields, labels, words, metrics, header_train, header_test, text, label, ncol, ncol_test, text_test):
    train = FileLayout(ncol, text, label, header_train)
    test = FileLayout(ncol_test, text_test, None, header_test)
    return TaskSpec(name, t2t, fields, labels, words, metrics,
                    {"train": [("train.tsv", train)], "valid": [("dev.tsv", train)], "test": [("test.tsv", test)]})


TASKS: dict[str, TaskSpec] = {}


def _add(spec: TaskSpec):
    TASKS[spec.name] = spec


_add(_pair_task("CoLA", "cola", ("sentence",), ("0", "1"), ("unacceptable", "acceptable"), ("mcc",),
                None, _tsv("index", "sentence"), (3,), 1, 4, 2, (1,)))
_add(_pair_task("SST-2", "sst2", ("sentence",), ("0", "1"), ("negative", "positive"), ("accuracy",),
                _tsv("sentence", "label"), _tsv("index", "sentence"), (0,), 1, 2, 2, (1,)))
_add(_pair_task("MRPC", "mrpc", ("sentence1", "sentence2"), ("0", "1"), ("not_equivalent", "equivalent"),
                ("f1", "accuracy"), _MRPC_HEADER, ("index",) + _MRPC_HEADER[1:], (3, 4), 0, 5, 5, (3, 4)))
_add(_pair_task("STS-B", "stsb", ("sentence1", "sentence2"), None, None, ("pearson", "spearman"),
                _STSB_HEADER, _STSB_HEADER[:-1], (7, 8), 9, 10, 9, (7, 8)))
_add(_pair_task("QQP", "qqp", ("question1", "question2"), ("0", "1"), ("not_duplicate", "duplicate"),
                ("f1", "accuracy"), _tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                _tsv("id", "question1", "question2"), (3, 4), 5, 6, 3, (1, 2)))
_add(_pair_task("QNLI", "qnli", ("question", "sentence"), ("entailment", "not_entailment"),
                ("entailment", "not_entailment"), ("accuracy",), _tsv("index", "question", "sentence", "label"),
                _tsv("index", "question", "sentence"), (1, 2), 3, 4, 3, (1, 2)))
_add(_pair_task("RTE", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                ("entailment", "not_entailment"), ("accuracy",), _tsv("index", "sentence1", "sentence2", "label"),
                _tsv("index", "sentence1", "sentence2"), (1, 2), 3, 4, 3, (1, 2)))
_add(_pair_task("WNLI", "wnli", ("sentence1", "sentence2"), ("0", "1"), ("not_entailment", "entailment"),
                ("accuracy",), _tsv("index", "sentence1", "sentence2", "label"),
                _tsv("index", "sentence1", "sentence2"), (1, 2), 3, 4, 3, (1, 2)))

_MNLI_TRAIN = FileLayout(12, (8, 9), -1, _MNLI_TRAIN_HEADER)
_MNLI_DEV = FileLayout(16, (8, 9), -1, _MNLI_DEV_HEADER)
_MNLI_TEST = FileLayout(10, (8, 9), None, _MNLI_TRAIN_HEADER[:10])
_AX = FileLayout(3, (1, 2), None, _tsv("index", "sentence1", "sentence2"))
_add(TaskSpec(
    "MNLI", "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
    ("entailment", "neutral", "contradiction"), ("accuracy",),
    {
        "train": [("train.tsv", _MNLI_TRAIN)],
        "valid": [("dev_matched.tsv", _MNLI_DEV), ("dev_mismatched.tsv", _MNLI_DEV)],
        "test": [("test_matched.tsv", _MNLI_TEST), ("test_mismatched.tsv", _MNLI_TEST),
                 ("../diagnostic/diagnostic.tsv", _AX)],
    },
))

_ALIASES = {k.lower().replace("-", ""): k for k in TASKS}


def resolve_task(name: str) -> TaskSpec:
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)} (or 'all')")
    return TASKS[_ALIASES[key]]


@dataclass
class Example:
    texts: tuple  # one stripped string per input
    label: str | None  # label string as in the file (STS-B: the score text); None for unlabelled
    line: int  # 1-based physical line in the file

    @property
    def score(self) -> float:
        return float(self.label)


@dataclass
class ParseResult:
    path: Path
    examples: list
    rows_read: int = 0
    skipped: list = field(default_factory=list)  # "file:line: reason"


def _check_row(spec: TaskSpec, layout: FileLayout, cols: list, where: str):
    if len(cols) != layout.n_columns:
        return f"{where}: expected {layout.n_columns} tab-separated columns, got {len(cols)}"
    texts = tuple(cols[i].strip() for i in layout.text_columns)
    for i, text in zip(layout.text_columns, texts):
        if not text:
            return f"{where}: empty text in column {i}"
    if layout.label_column is None:
        return texts, None
    label = cols[layout.label_column].strip()
    if spec.regression:
        try:
            score = float(label)
        except ValueError:
            return f"{where}: score {label!r} is not a number"
        if not (math.isfinite(score) and 0.0 <= score <= 5.0):
            return f"{where}: score {label!r} is outside [0, 5]"
    elif label not in spec.labels:
        return f"{where}: unknown label {label!r} (expected one of {', '.join(spec.labels)})"
    return texts, label


def parse_file(path, spec: TaskSpec, layout: FileLayout, skip_bad_rows=False) -> ParseResult:
    """Parse one GLUE tsv. Raises GlueFormatError `file:line: ...` unless `skip_bad_rows`."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GlueFormatError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    # Only "\n" ends a row: csv.QUOTE_NONE-style, a stray "\r" is stripped at the end of a line.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    result = ParseResult(path, [])
    start = 0
    if layout.header is not None:
        if not lines:
            raise GlueFormatError(f"{path}:1: empty file, expected a header row")
        got = tuple(c.strip() for c in lines[0].rstrip("\r").split("\t"))
        if got != layout.header:
            raise GlueFormatError(
                f"{path}:1: unexpected header {list(got)}; expected {list(layout.header)} "
                f"(is this the standard GLUE release?)"
            )
        start = 1
    for lineno, line in enumerate(lines[start:], start=start + 1):
        result.rows_read += 1
        cols = line.rstrip("\r").split("\t")
        checked = _check_row(spec, layout, cols, f"{path}:{lineno}")
        if isinstance(checked, str):
            if not skip_bad_rows:
                raise GlueFormatError(checked)
            result.skipped.append(checked)
            continue
        result.examples.append(Example(checked[0], checked[1], lineno))
    return result


def split_files(glue_dir, spec: TaskSpec, split: str):
    """[(path, layout)] for a GLUE split ('train', 'valid', 'test'), in fairseq order."""
    base = Path(glue_dir) / spec.name
    return [((base / name).resolve() if name.startswith("..") else base / name, layout)
            for name, layout in spec.files[split]]


def read_split(glue_dir, task: str, split: str = "train", skip_bad_rows=False) -> list:
    """Parsed examples of every file of a split ('train', 'valid', 'test'), one list per file."""
    spec = resolve_task(task)
    return [parse_file(p, spec, layout, skip_bad_rows).examples for p, layout in split_files(glue_dir, spec, split)]
