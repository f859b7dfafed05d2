"""Seed statistics of the quality study against hand-computed values."""

import math

import pytest

from robustft_experiments.stats import paired, summarize, t_interval


def test_summary_n1_has_no_spread():
    s = summarize([71.5])
    assert (s.n, s.mean, s.std) == (1, 71.5, None)
    assert "±" not in s.text()
    assert summarize([]).text() == "–"


def test_summary_sample_std():
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = (16/9 + 1/9 + 25/9) / 2 = 7/3
    assert s.std == pytest.approx(math.sqrt(7 / 3))
    assert s.text() == "2.33 ± 1.53 (n=3)"


def test_t_interval_matches_table_value():
    # diffs 1, 2, 3: mean 2, sd 1, t(0.975, df=2) = 4.302653 (statistical tables)
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert low == pytest.approx(2 - half, abs=1e-5) and high == pytest.approx(2 + half, abs=1e-5)
    assert t_interval([5.0]) == (None, None)


def test_paired_uses_common_seeds_and_counts_wins():
    method = {1: 60.0, 2: 55.0, 3: 58.0, 4: 70.0}
    baseline = {1: 58.0, 2: 55.0, 3: 59.0}  # seed 4 has no baseline run: not paired
    p = paired(method, baseline)
    assert p.seeds == (1, 2, 3) and p.n == 3
    assert p.mean_diff == pytest.approx((2 + 0 - 1) / 3)
    assert (p.wins, p.ties) == (1, 1)
    assert p.ci_low < p.mean_diff < p.ci_high
    assert "wins 1/3" in p.text()
    assert paired({1: 1.0}, {2: 1.0}).text() == "–"
