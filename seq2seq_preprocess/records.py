"""What a dataset reader returns (examples per split, with where each came from) and the strict file readers
the dataset modules share: UTF-8 text split on "\\n" only, JSON lines, CSV with quoted multi-line fields,
tab-separated with a header, line-aligned file pairs. Every bad row is reported as `file:line: reason`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class Seq2SeqFormatError(ValueError):
    """A malformed row or file of a dataset release; the message starts with `file:line:`."""


@dataclass
class Example:
    """One example. Summarisation: texts = (document,), target = summary. Classification: texts = the
    sentences (premise, hypothesis), target = the label as the release spells it after normalisation."""

    texts: tuple[str, ...]
    target: str
    where: str  # "file:line" (or "file: key") of the row, for messages
    id: str = ""
    reference: str | None = None  # ROUGE reference when it differs from target (sentences split by "\n")
    group: str | None = None  # XNLI: the language

    @property
    def ref(self) -> str:
        return self.target if self.reference is None else self.reference


@dataclass
class SplitData:
    """The examples of one output split and what reading them did (summary.json reports it)."""

    name: str  # fairseq split name: train, valid, test, valid_en, test_fr, ...
    examples: list[Example] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of malformed rows skipped
    dropped: dict[str, int] = field(default_factory=dict)  # rows every loader of the release drops, by reason
    changed: dict[str, int] = field(default_factory=dict)  # rows normalised (e.g. Gigaword <unk> -> UNK)

    def info(self) -> dict:
        return {
            "files": self.files,
            "rows_read": self.rows_read,
            "rows_written": len(self.examples),
            "rows_skipped": len(self.skipped),
            "skipped_examples": self.skipped[:20],
            "dropped": dict(self.dropped),
            "changed": dict(self.changed),
        }


class Rows:
    """Collects one split's examples; a bad row raises Seq2SeqFormatError or, with skip_bad_rows, is counted."""

    def __init__(self, split: str, skip_bad_rows: bool):
        self.data = SplitData(split)
        self.skip_bad_rows = skip_bad_rows

    def read_file(self, path: Path) -> None:
        self.data.files.append(str(path))

    def bad(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip_bad_rows:
            raise Seq2SeqFormatError(message)
        self.data.skipped.append(message)

    def drop(self, reason: str) -> None:
        self.data.dropped[reason] = self.data.dropped.get(reason, 0) + 1

    def change(self, reason: str, n: int = 1) -> None:
        self.data.changed[reason] = self.data.changed.get(reason, 0) + n

    def add(self, example: Example) -> None:
        self.data.examples.append(example)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found ({what})")
    return path


def first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of `candidates` (paths relative to root) that is a file, else None."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    return None


def read_text(path: Path) -> str:
    """The file as text: strict UTF-8 (error names the line), a leading BOM dropped."""
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise Seq2SeqFormatError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def split_lines(text: str) -> list[str]:
    """Lines split on "\\n" only (a "\\r" inside a line would split it in Python's text mode and shift
    line-aligned source/target files: fairseq #1423); a "\\r" before the "\\n" is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def one_line(text: str) -> str:
    """Stripped, with line breaks inside turned into spaces: one example is one line of the token files."""
    if "\n" in text or "\r" in text:
        text = " ".join(part.strip() for part in text.replace("\r", "\n").split("\n") if part.strip())
    return text.strip()


def iter_jsonl(path: Path, rows: Rows) -> Iterator[tuple[str, dict]]:
    """(file:line, object) per non-empty line of a JSON-lines file; a line that is not a JSON object is bad."""
    rows.read_file(path)
    for lineno, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rows.data.rows_read += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            rows.bad(where, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield where, obj


def json_str(obj: dict, key: str, where: str, rows: Rows, *, null_ok: bool = False) -> str | None:
    """obj[key] as a string; a missing key or a non-string is a bad row (JSON null allowed if null_ok -> "")."""
    if key not in obj:
        rows.bad(where, f"missing field {key!r} (fields: {', '.join(sorted(obj))})")
        return None
    value = obj[key]
    if value is None and null_ok:
        return ""
    if not isinstance(value, str):
        rows.bad(where, f"field {key!r} must be a string, got {type(value).__name__}")
        return None
    return value


def json_strs(obj: dict, keys: Sequence[str], where: str, rows: Rows, null_ok: Sequence[str] = ()):
    """(obj[k] for k in keys) as strings, or None after reporting the first missing / non-string field."""
    values = []
    for key in keys:
        value = json_str(obj, key, where, rows, null_ok=key in null_ok)
        if value is None:
            return None
        values.append(value)
    return tuple(values)


def iter_csv(path: Path, rows: Rows, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(file:line, {column: value}) per CSV record (RFC 4180 quoting, fields may span lines; the line is
    where the record starts). The header must name every column of `columns`."""
    rows.read_file(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise Seq2SeqFormatError(f"{path}:1: empty file, expected a header row") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise Seq2SeqFormatError(f"{path}:1: header {header} lacks column(s) {missing}")
    index = {c: header.index(c) for c in columns}
    start = reader.line_num + 1
    for record in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not record:
            continue
        rows.data.rows_read += 1
        if len(record) != len(header):
            rows.bad(where, f"expected {len(header)} fields, got {len(record)} (unbalanced quotes?)")
            continue
        yield where, {c: record[i] for c, i in index.items()}


def iter_tsv(path: Path, rows: Rows, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(file:line, {column: value}) per row of a tab-separated file with a header, no quote handling
    (csv.QUOTE_NONE: a `"` is an ordinary character). Columns are found by header name."""
    rows.read_file(path)
    lines = split_lines(read_text(path))
    if not lines:
        raise Seq2SeqFormatError(f"{path}:1: empty file, expected a header row")
    header = lines[0].split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise Seq2SeqFormatError(f"{path}:1: header {header} lacks column(s) {missing}")
    index = {c: header.index(c) for c in columns}
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}:{lineno}"
        rows.data.rows_read += 1
        cols = line.split("\t")
        if len(cols) != len(header):
            rows.bad(where, f"expected {len(header)} tab-separated columns, got {len(cols)}")
            continue
        yield where, {c: cols[i] for c, i in index.items()}


def iter_paired_lines(source: Path, target: Path, rows: Rows) -> Iterator[tuple[str, str, str]]:
    """(file:line, source line, target line) of two line-aligned files (line i pairs with line i).
    Unequal line counts are an error of the files, never skipped: every later pair would be wrong."""
    rows.read_file(source)
    rows.read_file(target)
    src, tgt = split_lines(read_text(source)), split_lines(read_text(target))
    if len(src) != len(tgt):
        short, long_, n = (source, target, len(src)) if len(src) < len(tgt) else (target, source, len(tgt))
        raise Seq2SeqFormatError(
            f"{short}:{n + 1}: file ends after {n} lines but {long_} has {max(len(src), len(tgt))}; "
            "line-aligned source/target files must have equal line counts"
        )
    for lineno, (s, t) in enumerate(zip(src, tgt), start=1):
        rows.data.rows_read += 1
        yield f"{source}:{lineno}", s, t


# file-name spellings of each fairseq split across releases (HF "validation", BART/GEM "val", Gigaword "dev")
SPLIT_SPELLINGS = {"train": ("train",), "valid": ("validation", "val", "valid", "dev"), "test": ("test",)}


def find_split_files(root: Path, patterns: Sequence[str]) -> dict[str, Path]:
    """{fairseq split: path} for the files `pattern.format(split=spelling)` present under root, first match
    per split; e.g. patterns ("{split}.jsonl",) finds train.jsonl, validation.jsonl or val.jsonl, test.jsonl."""
    found = {}
    for split, spellings in SPLIT_SPELLINGS.items():
        path = first_existing(root, [p.format(split=s) for p in patterns for s in spellings])
        if path is not None:
            found[split] = path
    return found


def jsonl_splits(root: Path, skip_bad_rows: bool, add, patterns: Sequence[str] = ("{split}.jsonl",)) -> dict:
    """{split: SplitData} of a folder of exported JSON-lines splits; `add(rows, where, obj)` turns each object
    into an example (or a bad / dropped row)."""
    out = {}
    for split, path in find_split_files(root, patterns).items():
        rows = Rows(split, skip_bad_rows)
        for where, obj in iter_jsonl(path, rows):
            add(rows, where, obj)
        out[split] = rows.data
    return out


def add_stripped_pair(rows: Rows, where: str, src: str, tgt: str) -> None:
    """`paired_splits`' `add` for releases whose lines are the rows as they are (stripped)."""
    rows.add(Example((src.strip(),), tgt.strip(), where))


def paired_splits(root: Path, skip_bad_rows: bool, source_pattern: str, target_of, add) -> dict:
    """{split: SplitData} of line-aligned source/target files: sources found with `source_pattern`
    (e.g. "{split}.source"), `target_of(source path)` names the target file, `add(rows, where, src, tgt)`."""
    out = {}
    for split, source in find_split_files(root, (source_pattern,)).items():
        rows = Rows(split, skip_bad_rows)
        for where, src, tgt in iter_paired_lines(source, target_of(source), rows):
            add(rows, where, src, tgt)
        out[split] = rows.data
    return out
