"""The NLI tasks of the Hyperdecoders summarisation + NLI mixture, cast to text-to-text as the reference does
(allenai/hyperdecoders `data/tasks.py` `seq2seq_format` L187-202, anli L710-737, art L740-763, mnli;
datasets.md §8c): the source is the task name, then `field: text` pairs; the target is the class id as a string.

| task | source | target |
|---|---|---|
| anli | `anli premise: {premise} hypothesis: {hypothesis}` | `0` / `1` / `2` (entailment / neutral / contradiction) |
| art | `art observation 1: {o1} observation 2: {o2} hypothesis 1: {h1} hypothesis 2: {h2}` | `1` / `2` |
| mnli | `mnli premise: {premise} hypothesis: {hypothesis}` | `0` / `1` / `2` |

Also the reader of abductive NLI (ART, Bhagavatula et al. 2020; datasets.md §8a), which the dataset table does
not list (its four texts fit no sentence-prediction layout): `{train,dev}.jsonl` (obs1, obs2, hyp1, hyp2) with
`{train,dev}-labels.lst` (one label per line, `1` or `2`: the more plausible hypothesis), line-aligned.
"""

from __future__ import annotations

import json
from pathlib import Path

from .datasets.anli import LABELS as ANLI_LABELS
from .records import Example, Rows, Seq2SeqFormatError, SplitData, one_line, read_text, split_lines
from .registry import ReadOptions

ART_LABELS = ("1", "2")
ART_FILES = {"train": "train", "valid": "dev", "test": "test"}
ART_FIELDS = ("obs1", "obs2", "hyp1", "hyp2")
MNLI_LABELS = ("entailment", "neutral", "contradiction")  # HF glue/mnli class ids 0, 1, 2


def read_art(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    """{train, valid[, test]} of an ART release folder (`alphanli-train-dev.zip` unpacked)."""
    root = Path(root)
    out = {}
    for split, stem in ART_FILES.items():
        data_path, label_path = root / f"{stem}.jsonl", root / f"{stem}-labels.lst"
        if not data_path.is_file():
            continue
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path}: not found (the labels of {data_path}, one per line)")
        rows = Rows(split, options.skip_bad_rows)
        rows.read_file(data_path)
        rows.read_file(label_path)
        lines = split_lines(read_text(data_path))
        labels = [line.strip() for line in split_lines(read_text(label_path))]
        if len(lines) != len(labels):
            raise Seq2SeqFormatError(
                f"{label_path}:{min(len(lines), len(labels)) + 1}: {len(labels)} labels but {data_path} has "
                f"{len(lines)} lines; the files must be line-aligned"
            )
        for lineno, (line, label) in enumerate(zip(lines, labels), start=1):
            rows.data.rows_read += 1
            where = f"{data_path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            texts = [obj.get(k) for k in ART_FIELDS] if isinstance(obj, dict) else []
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                rows.bad(where, f"fields {', '.join(ART_FIELDS)} must be non-empty strings")
            elif label not in ART_LABELS:
                rows.bad(f"{label_path}:{lineno}", f"label {label!r} is not 1 or 2")
            else:
                rows.add(Example(tuple(one_line(str(t)) for t in texts), label, where, str(obj.get("story_id", ""))))
        out[split] = rows.data
    if "train" not in out:
        raise FileNotFoundError(f"{root}: no train.jsonl + train-labels.lst (ART, alphanli-train-dev.zip)")
    return out


def cast_anli(example: Example) -> tuple[str, str]:
    premise, hypothesis = example.texts
    return f"anli premise: {premise} hypothesis: {hypothesis}", str(ANLI_LABELS.index(example.target))


def cast_mnli(example: Example) -> tuple[str, str]:
    premise, hypothesis = example.texts
    return f"mnli premise: {premise} hypothesis: {hypothesis}", str(MNLI_LABELS.index(example.target))


def cast_art(example: Example) -> tuple[str, str]:
    o1, o2, h1, h2 = example.texts
    return f"art observation 1: {o1} observation 2: {o2} hypothesis 1: {h1} hypothesis 2: {h2}", example.target


# task -> (cast, the targets in class-id order)
NLI_CASTS = {
    "anli": (cast_anli, ("0", "1", "2")),
    "art": (cast_art, ART_LABELS),
    "mnli": (cast_mnli, ("0", "1", "2")),
}
