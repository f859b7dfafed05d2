"""Startup checks for flag values: every error names the flag and says what would be valid."""

from __future__ import annotations

import math


def require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{flag}: {message}")


def require_finite_nonnegative(flag: str, value: float) -> None:
    require(
        value is not None and math.isfinite(value) and value >= 0, flag, f"must be a finite number >= 0, got {value!r}"
    )


def require_positive(flag: str, value: float) -> None:
    require(
        value is not None and math.isfinite(value) and value > 0, flag, f"must be a finite number > 0, got {value!r}"
    )


def require_probability(flag: str, value: float) -> None:
    require(
        value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, flag, f"must be in [0, 1], got {value!r}"
    )


def require_choice(flag: str, value, choices) -> None:
    require(
        str(value) in {str(c) for c in choices}, flag, f"must be one of {', '.join(map(str, choices))}; got {value!r}"
    )


def label_names(label_dict) -> list[str]:
    """The labels of a fairseq label dictionary: its symbols after the specials, without the `<mask>`
    sentence_prediction's `load_dictionary` appends (fairseq/tasks/sentence_prediction.py:115) and the
    `madeupwordNNNN` fillers fairseq-preprocess pads a dictionary with (`--padding-factor`, default 8)."""
    return [s for s in label_dict.symbols[label_dict.nspecial :] if s != "<mask>" and not s.startswith("madeupword")]


def require_num_classes(label_dict, num_classes, data) -> None:
    """--num-classes equals the number of labels of DATA/label/dict.txt (fairseq sizes the classification
    head by the flag alone, sentence_prediction.py:283: more classes train silently, fewer fail mid-batch
    with `IndexError: Target 1 is out of bounds`)."""
    labels = label_names(label_dict)
    regression = (
        " (or --regression-target, for a regression task such as STS-B with label/<split>.label files)"
        if num_classes == 1
        else ""
    )
    require(
        num_classes is None or num_classes == len(labels),
        "--num-classes",
        f"is {num_classes}, but the label dictionary {data}/label/dict.txt has {len(labels)} labels "
        f"({', '.join(labels)}): pass --num-classes {len(labels)}{regression}",
    )
