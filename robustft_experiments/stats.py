"""Seed statistics a reviewer asks for: mean ± sample std over seeds, and the paired difference of a
method to its baseline (same seed = same data order, head init and dropout stream) with a 95 %
Student-t confidence interval and wins / seeds.

Pure functions over plain lists; no I/O. n = 1 has no spread: std and intervals are None, never 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample std (n - 1); None for n < 2

    def text(self, digits: int = 2) -> str:
        if self.n == 0 or self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


@dataclass(frozen=True)
class Paired:
    n: int  # seeds present for both the method and its baseline
    mean_diff: float | None
    ci_low: float | None  # 95 % t interval of the mean difference; None for n < 2
    ci_high: float | None
    wins: int  # seeds where the method beat its baseline
    ties: int
    seeds: tuple

    def text(self, digits: int = 2) -> str:
        if self.n == 0 or self.mean_diff is None:
            return "–"
        head = f"{self.mean_diff:+.{digits}f}"
        if self.ci_low is not None:
            head += f" [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"
        return f"{head}, wins {self.wins}/{self.n}"


def summarize(values: Sequence[float]) -> Summary:
    vals = [float(v) for v in values]
    if not vals:
        return Summary(0, None, None)
    return Summary(len(vals), statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Student-t interval of the mean; (None, None) for fewer than two values."""
    n = len(values)
    if n < 2:
        return None, None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired(method: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95) -> Paired:
    """method[seed] - baseline[seed] over the seeds both have."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    if not diffs:
        return Paired(0, None, None, None, 0, 0, ())
    low, high = t_interval(diffs, level)
    return Paired(
        len(diffs), statistics.fmean(diffs), low, high, sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), seeds
    )


def by_seed(rows: Sequence[Mapping], value_key: str = "value") -> dict[tuple, dict[int, float]]:
    """{(task, method): {seed: value}} from rows with task, method, seed and a finished value."""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r.get(value_key) is None:
            continue
        out.setdefault((r["task"], r["method"]), {})[int(r["seed"])] = float(r[value_key])
    return out
