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
