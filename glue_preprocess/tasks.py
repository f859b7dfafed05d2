"""A strict GLUE tsv parser (tab-split, no quote handling = csv.QUOTE_NONE) over the layouts of the GLUE
task table (`robustft_common.glue_tasks`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from robustft_common import glue_tasks
from robustft_common.glue_tasks import TASKS, FileLayout, GlueTask

__all__ = [
    "TASKS",
    "FileLayout",
    "TaskSpec",
    "GlueFormatError",
    "Example",
    "ParseResult",
    "resolve_task",
    "parse_file",
    "require_rows",
    "split_files",
    "read_split",
]


class GlueFormatError(ValueError):
    """A malformed GLUE row or file; the message starts with `file:line:`."""


# The task facts (layouts, labels, metrics) live in the one GLUE task table; this module parses files.
TaskSpec = GlueTask


def resolve_task(name: str) -> TaskSpec:
    """The task for any usual spelling; ValueError naming --tasks (the CLI also accepts 'all')."""
    try:
        return glue_tasks.resolve_task(name, "--tasks")
    except ValueError as err:
        raise ValueError(f"{err} (or 'all')") from None


@dataclass
class Example:
    texts: tuple  # one stripped string per input
    label: str | None  # label string as in the file (STS-B: the score text); None for unlabelled
    line: int  # 1-based physical line in the file

    @property
    def score(self) -> float:
        if self.label is None:  # float(None) would raise this TypeError, less clearly
            raise TypeError(f"line {self.line}: unlabelled example has no score")
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
    else:
        labels = spec.labels
        assert labels is not None  # only regression tasks (handled above) have no labels
        if label not in labels:
            return f"{where}: unknown label {label!r} (expected one of {', '.join(labels)})"
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
    require_rows(result, has_header=layout.header is not None)
    return result


def require_rows(result: ParseResult, has_header: bool) -> None:
    """A file that yields no example is an error: fairseq-preprocess would write no split for it, and training
    fail much later with "could not find dataset"."""
    if result.examples:
        return
    if result.skipped:
        raise GlueFormatError(
            f"{result.skipped[0]}; every one of the {result.rows_read} rows of the file was bad (--skip-bad-rows): "
            f"nothing left to write"
        )
    what = "only a header row, no data rows" if has_header else "no data rows"
    raise GlueFormatError(f"{result.path}:{2 if has_header else 1}: the file has {what}")


def split_files(glue_dir, spec: TaskSpec, split: str):
    """[(path, layout)] for a GLUE split ('train', 'valid', 'test'), in fairseq order."""
    base = Path(glue_dir) / spec.name
    return [
        ((base / name).resolve() if name.startswith("..") else base / name, layout)
        for name, layout in spec.files[split]
    ]


def read_split(glue_dir, task: str, split: str = "train", skip_bad_rows=False) -> list:
    """Parsed examples of every file of a split ('train', 'valid', 'test'), one list per file."""
    spec = resolve_task(task)
    return [parse_file(p, spec, layout, skip_bad_rows).examples for p, layout in split_files(glue_dir, spec, split)]
