"""Gigaword headline generation (Rush et al. 2015): article first sentence -> headline, line-aligned files.

The text is lowercased, PTB-tokenised, digits replaced by `#` (datasets.md §3). Quirk: train/dev write
unknown words as `<unk>`, test as `UNK`; like the HF loader (>= 1.2.0) we write `UNK` everywhere, so the
model sees one spelling (GPT-2 BPE would split `<unk>` into `<`, `unk`, `>`); the count is in
summary.json (`changed`). Lines are kept as they are otherwise (HF keeps every row).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..records import Example, Rows, SplitData, iter_paired_lines
from ..registry import Dataset, Format, Generation, ReadOptions, register

# (source, target) file names per split, per layout of the release
LAYOUTS = {
    # the UniLM / HF `gigaword` copy (org_data/) and the Rush et al. style train.src/train.tgt files
    "src_tgt": {
        "train": [("org_data/train.src.txt", "org_data/train.tgt.txt"), ("train.src", "train.tgt")],
        "valid": [("org_data/dev.src.txt", "org_data/dev.tgt.txt"), ("dev.src", "dev.tgt"), ("valid.src", "valid.tgt")],
        "test": [("org_data/test.src.txt", "org_data/test.tgt.txt"), ("test.src", "test.tgt")],
    },
    # the HarvardNLP sent-summary archive
    "harvard": {
        "train": [("train/train.article.txt", "train/train.title.txt")],
        "valid": [("train/valid.article.filter.txt", "train/valid.title.filter.txt")],
        "test": [("Giga/input.txt", "Giga/task1_ref0.txt")],
    },
}
UNK = re.compile(r"<unk>")
# Not published for Gigaword by BART or R3F: XSum's beam / length penalty / trigram blocking, with lengths
# for one-line headlines (references average ~8 words, ~10 GPT-2 tokens).
GIGAWORD_KWARGS = Generation(
    6,
    1.0,
    30,
    1,
    3,
    "ours (BART/R3F publish none): XSum's beam, lenpen, no-repeat; max 30 / min 1 for headlines",
)


def _pair(root: Path, candidates) -> tuple[Path, Path] | None:
    for src, tgt in candidates:
        if (root / src).is_file() and (root / tgt).is_file():
            return root / src, root / tgt
    return None


def _detector(layout: str) -> Callable[[Path], bool]:
    return lambda root: _pair(root, LAYOUTS[layout]["train"]) is not None


def _reader(layout: str):
    def read(root: Path, options: ReadOptions) -> dict[str, SplitData]:
        out = {}
        for split, candidates in LAYOUTS[layout].items():
            pair = _pair(root, candidates)
            if pair is None:
                continue
            rows = Rows(split, options.skip_bad_rows)
            for where, src, tgt in iter_paired_lines(*pair, rows):
                n = len(UNK.findall(src)) + len(UNK.findall(tgt))
                if n:
                    rows.change("<unk> -> UNK", n)
                    src, tgt = UNK.sub("UNK", src), UNK.sub("UNK", tgt)
                rows.add(Example((src.strip(),), tgt.strip(), where))
            out[split] = rows.data
        return out

    return read


register(
    Dataset(
        name="gigaword",
        kind="summarization",
        formats=tuple(
            Format(
                layout,
                " or ".join(f"{s}/{t}" for s, t in splits["train"]) + " (+ valid/test pairs)",
                _detector(layout),
                _reader(layout),
            )
            for layout, splits in LAYOUTS.items()
        ),
        download=(
            "https://github.com/harvardnlp/sent-summary (the Rush et al. archive: train/, Giga/), or the UniLM / HF "
            "copy org_data/{train,dev,test}.{src,tgt}.txt (https://github.com/microsoft/unilm, unilm-v1 README)"
        ),
        description="Gigaword headline generation, 3,803,957 / 189,651 / 1,951 rows (HF)",
        generation=GIGAWORD_KWARGS,
    )
)
