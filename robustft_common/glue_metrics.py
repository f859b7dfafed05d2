"""GLUE metrics, once: from arrays (evaluation scripts) and from summable counts (training logs).
Which metric(s) each task reports is in the GLUE task table (`robustft_common.glue_tasks`).

Count-based forms exist because fairseq sums logging outputs across data-parallel workers before
`reduce_metrics`; a confusion matrix and the moments (n, Σx, Σy, Σx², Σy², Σxy) sum correctly where
lists of predictions do not (fairseq's stock criterion crashes there with >1 process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr


def accuracy(preds: Sequence, targets: Sequence) -> float:
    p, t = np.asarray(preds), np.asarray(targets)
    return float(np.mean(p == t)) if len(t) else float("nan")


def confusion_counts(preds: Sequence, targets: Sequence, positive=1) -> dict[str, int]:
    p, t = np.asarray(preds) == positive, np.asarray(targets) == positive
    return {
        "tp": int((p & t).sum()),
        "fp": int((p & ~t).sum()),
        "fn": int((~p & t).sum()),
        "tn": int((~p & ~t).sum()),
    }


def f1_from_counts(tp, fp, fn, tn=0) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def mcc_from_counts(tp, fp, fn, tn) -> float:
    """Binary Matthews correlation; 0 when a margin is empty (sklearn's convention)."""
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def f1(preds, targets, positive=1) -> float:
    return f1_from_counts(**confusion_counts(preds, targets, positive))


def matthews_corr(preds, targets, positive=1) -> float:
    return mcc_from_counts(**confusion_counts(preds, targets, positive))


def pearson_from_moments(n, sx, sy, sxx, syy, sxy) -> float:
    if n < 2:
        return float("nan")
    cov = sxy - sx * sy / n
    var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
    if var_x <= 0 or var_y <= 0:
        return float("nan")
    return cov / math.sqrt(var_x * var_y)


def moments(preds, targets) -> dict[str, float]:
    x, y = np.asarray(preds, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    return {"n": len(x), "sx": x.sum(), "sy": y.sum(), "sxx": (x * x).sum(), "syy": (y * y).sum(), "sxy": (x * y).sum()}


def pearson(preds, targets) -> float:
    return pearson_from_moments(**moments(preds, targets))


def spearman(preds, targets) -> float:
    if len(preds) < 2:
        return float("nan")
    return float(spearmanr(preds, targets)[0])
