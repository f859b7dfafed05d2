"""Tiny binarized datasets built in-process, for tests, smoke checks and benchmarks.

Writes exactly what `fairseq-preprocess --only-source` (RoBERTa GLUE layout) and the text-to-text
layout of `glue_preprocess` write — frequency-sorted dictionaries padded to a multiple of 8, mmap
indexed datasets — without paying a fairseq-preprocess process start (seconds) per column.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


def build_dictionary(*corpora: Sequence[str]):
    """A fairseq Dictionary over whitespace tokens, finalized as fairseq-preprocess does."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for lines in corpora:
        for line in lines:
            for word in line.split():
                dictionary.add_symbol(word)
    dictionary.finalize(padding_factor=8)
    return dictionary


def binarize_lines(dictionary, lines: Sequence[str], prefix: Path) -> None:
    """`prefix`.bin/.idx in fairseq's mmap format, one item per line with </s> appended."""
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(dictionary))
    for line in lines:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long())
    builder.finalize(f"{prefix}.idx")


def toy_rows(
    n: int, seed: int, vocab: int = 40, min_len: int = 3, max_len: int = 10
) -> list[tuple[list[str], list[str]]]:
    """n pairs of random sentences over words w0..w{vocab-1} (a reproducible toy corpus)."""
    rng = random.Random(seed)
    sentence = lambda: [f"w{rng.randrange(vocab)}" for _ in range(rng.randint(min_len, max_len))]  # noqa: E731
    return [(sentence(), sentence()) for _ in range(n)]


def write_sentence_prediction(out: Path, columns: dict[str, dict[str, list[str]]], regression: bool = False) -> Path:
    """RoBERTa GLUE layout: `columns[name][split]` lines for name in input0, input1 (optional), label.

    Dictionaries come from the train split; regression labels are written as text
    `label/<split>.label`, as fairseq's sentence_prediction task reads them.
    """
    for name, splits in columns.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        if name == "label" and regression:
            for split, lines in splits.items():
                (out / name / f"{split}.label").write_text("".join(f"{x}\n" for x in lines))
            continue
        dictionary = build_dictionary(splits["train"])
        dictionary.save(str(out / name / "dict.txt"))
        for split, lines in splits.items():
            binarize_lines(dictionary, lines, out / name / split)
    return out


def write_text2text(out: Path, splits: dict[str, tuple[list[str], list[str]]], dictionary_from: str = "train") -> Path:
    """Translation layout with one joint src/tgt dictionary (glue_preprocess --format text2text)."""
    out.mkdir(parents=True, exist_ok=True)
    src_train, tgt_train = splits[dictionary_from]
    dictionary = build_dictionary(src_train, tgt_train)
    for lang in ("src", "tgt"):
        dictionary.save(str(out / f"dict.{lang}.txt"))
    for split, (src, tgt) in splits.items():
        binarize_lines(dictionary, src, out / f"{split}.src-tgt.src")
        binarize_lines(dictionary, tgt, out / f"{split}.src-tgt.tgt")
    return out


def toy_classification(
    root: Path, n_train: int, n_valid: int, vocab: int = 40, min_len: int = 3, max_len: int = 10
) -> tuple[Path, Path]:
    """A binary toy task (label: is the first word in the lower half of the vocab?) written twice:
    RoBERTa GLUE layout (`root/sp-bin`, input0 + label) and text-to-text layout (`root/t2t-bin`)."""
    splits = {}
    for split, n, seed in (("train", n_train, 1), ("valid", n_valid, 2)):
        words = [a for a, _ in toy_rows(n, seed, vocab, min_len, max_len)]
        splits[split] = [(" ".join(a), int(a[0][1:]) < vocab // 2) for a in words]
    sp = write_sentence_prediction(
        root / "sp-bin",
        {
            "input0": {s: [r[0] for r in rows] for s, rows in splits.items()},
            "label": {s: ["pos" if r[1] else "neg" for r in rows] for s, rows in splits.items()},
        },
    )
    t2t = write_text2text(
        root / "t2t-bin",
        {
            s: ([f"sst2 sentence: {r[0]}" for r in rows], ["positive" if r[1] else "negative" for r in rows])
            for s, rows in splits.items()
        },
    )
    return sp, t2t
