"""Adversarial NLI (Nie et al. 2020), rounds R1-R3 concatenated per split as the Hyperdecoders reference loads
it (allenai/hyperdecoders `data/tasks.py` L710-737, following ExT5); datasets.md §8b.

Files: `anli_v1.0/R{1,2,3}/{train,dev,test}.jsonl` (the official zip; `R1/...` at the top level works too).
Keys read: `uid`, `context` (the premise; HF-exported files call it `premise`), `hypothesis`, `label`
(`e`/`n`/`c`, or HF's class id 0/1/2). Labels in HF `anli` class-id order: entailment, neutral, contradiction.
Splits: train, valid (dev), test; each example's round is its `group` (r1, r2, r3).
"""

from __future__ import annotations

from pathlib import Path

from ..records import Example, Rows, SplitData, iter_jsonl, one_line
from ..registry import Dataset, Format, ReadOptions, register

LABELS = ("entailment", "neutral", "contradiction")  # HF anli ClassLabel order (e -> 0, n -> 1, c -> 2)
LABEL_CODES = {
    "e": "entailment",
    "n": "neutral",
    "c": "contradiction",
    0: "entailment",
    1: "neutral",
    2: "contradiction",
}
ROUNDS = ("R1", "R2", "R3")
FILES = {"train": "train.jsonl", "valid": "dev.jsonl", "test": "test.jsonl"}


def _base(root: Path) -> Path:
    return root / "anli_v1.0" if (root / "anli_v1.0").is_dir() else root


def _label(value) -> str | None:
    return LABEL_CODES.get(value.strip() if isinstance(value, str) else value)


def _read(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    base = _base(root)
    out = {}
    for split, name in FILES.items():
        paths = [base / r / name for r in ROUNDS if (base / r / name).is_file()]
        if not paths:
            continue
        rows = Rows(split, options.skip_bad_rows)
        for path in paths:
            group = path.parent.name.lower()
            for where, obj in iter_jsonl(path, rows):
                premise = obj.get("context", obj.get("premise"))
                hypothesis, label = obj.get("hypothesis"), _label(obj.get("label"))
                if not isinstance(premise, str) or not isinstance(hypothesis, str):
                    rows.bad(where, "missing string 'context' (or 'premise') / 'hypothesis'")
                elif label is None:
                    rows.bad(where, f"unknown label {obj.get('label')!r} (expected e, n, c or 0, 1, 2)")
                elif not premise.strip() or not hypothesis.strip():
                    rows.bad(where, "empty premise or hypothesis")
                else:
                    texts = (one_line(premise), one_line(hypothesis))
                    rows.add(Example(texts, label, where, str(obj.get("uid", "")), group=group))
        out[split] = rows.data
    return out


def _detect(root: Path) -> bool:
    return any((_base(root) / r / "train.jsonl").is_file() for r in ROUNDS)


register(
    Dataset(
        name="anli",
        kind="classification",
        formats=(Format("jsonl", "[anli_v1.0/]R{1,2,3}/{train,dev,test}.jsonl", _detect, _read),),
        download="https://dl.fbaipublicfiles.com/anli/anli_v1.0.zip (github.com/facebookresearch/anli)",
        description="Adversarial NLI, R1+R2+R3: 162,865 / 3,200 / 3,200",
        labels=LABELS,
        extra={"rounds": ROUNDS},
    )
)
