"""Reddit TIFU, long version (Kim et al. 2019): post body -> its TL;DR.

Rows as the HF/TFDS `reddit_tifu` config `long` makes them (datasets.md §4): document =
`selftext_without_tldr.strip()`, summary = `tldr.strip()` (`null` -> ""), rows with an empty document or
summary dropped (42,139 remain). The release has no split: from the raw file we split with a seeded shuffle
into 80 / 10 / 10 % (PEGASUS's proportions; TFDS's row order, hence PEGASUS's exact rows, cannot be rebuilt
from the file, and the split R3F used is not known: r3f.md §3.11, fairseq #4083 / #4411).
A folder of exported splits ({train,validation,test}.jsonl with `documents`, `tldr`) is used as it is.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..records import Example, Rows, SplitData, find_split_files, first_existing, iter_jsonl, json_strs, jsonl_splits
from ..registry import Dataset, Format, Generation, ReadOptions, register

RAW_FILES = ("tifu_all_tokenized_and_filtered.json", "tifu_tokenized_and_filtered.json")
FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
# Not published for Reddit TIFU by BART or R3F: XSum's settings (abstractive one-to-two sentence summaries).
TIFU_KWARGS = Generation(6, 1.0, 60, 10, 3, "ours (BART/R3F publish none): XSum's settings (short abstractive TL;DRs)")


def _add(rows: Rows, where: str, obj: dict, document_key: str) -> None:
    fields = json_strs(obj, (document_key, "tldr"), where, rows, null_ok=("tldr",))
    if fields is None:
        return
    document, tldr = fields
    document, tldr = " ".join(document.split()), " ".join(tldr.split())  # posts have line breaks
    if not document:
        rows.drop("empty document")
    elif not tldr:
        rows.drop("no tldr")
    else:
        rows.add(Example((document,), tldr, where, str(obj.get("id", ""))))


def seeded_split(n: int, seed: int) -> dict[str, list[int]]:
    """Row indices per split: a random.Random(seed) shuffle cut 80/10/10, each split in file order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for i, (split, fraction) in enumerate(FRACTIONS):
        end = n if i == len(FRACTIONS) - 1 else start + round(fraction * n)
        out[split] = sorted(order[start:end])
        start = end
    return out


def _read_raw(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    path = first_existing(root, RAW_FILES)
    assert path is not None  # detected
    rows = Rows("all", options.skip_bad_rows)
    for where, obj in iter_jsonl(path, rows):
        _add(rows, where, obj, "selftext_without_tldr")
    kept = rows.data.examples
    out = {}
    for split, indices in seeded_split(len(kept), options.seed).items():
        data = SplitData(split, [kept[i] for i in indices], files=[str(path)])
        if split == "train":  # what reading the one file did is reported once
            data.rows_read, data.skipped, data.dropped = rows.data.rows_read, rows.data.skipped, rows.data.dropped
        out[split] = data
    return out


def _read_jsonl(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    return jsonl_splits(root, options.skip_bad_rows, lambda rows, where, obj: _add(rows, where, obj, "documents"))


register(
    Dataset(
        name="reddit_tifu",
        aliases=("reddit_tifu_long", "tifu"),
        kind="summarization",
        formats=(
            Format(
                "raw",
                " or ".join(RAW_FILES) + " (JSON lines)",
                lambda r: first_existing(r, RAW_FILES) is not None,
                _read_raw,
            ),
            Format(
                "jsonl",
                "{train,validation,test}.jsonl with documents, tldr (HF/TFDS reddit_tifu long, exported)",
                lambda root: "train" in find_split_files(root, ("{split}.jsonl",)),
                _read_jsonl,
            ),
        ),
        download=(
            "https://github.com/ctr4si/MMN (README: Drive file tifu_all_tokenized_and_filtered.json); or HF/TFDS "
            "`reddit_tifu` config long, split and exported with Dataset.to_json"
        ),
        description="Reddit TIFU long (TL;DR summaries), 42,139 rows after the HF filter; seeded 80/10/10 split",
        generation=TIFU_KWARGS,
    )
)
