"""Scoring generated GLUE text-to-text predictions (glue_preprocess `--format text2text` layout).

Per-example contributions are kept as summable counts (confusion matrix, Pearson moments), so they
can be summed over batches and data-parallel workers; Spearman needs the (prediction, gold) pairs.
Metric formulas come from `robustft_common.glue_metrics` (never re-derived here).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

from robustft_common import glue_metrics, glue_tasks

# text-to-text task names written by glue_preprocess, in the GLUE task table's order
TASKS = tuple(t.t2t_name for t in glue_tasks.TASKS.values())
INVALID_STSB = -1.0  # reference postprocessor's value for an unparseable STS-B prediction
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def _task(task: str) -> glue_tasks.GlueTask:
    spec = glue_tasks.BY_T2T.get(task)
    if spec is None:
        raise ValueError(f"unknown text-to-text task {task!r}; expected one of {', '.join(TASKS)}")
    return spec


def task_metric_names(task: str) -> Sequence[str]:
    return _task(task).metrics


def is_regression(task: str) -> bool:
    return _task(task).regression


def positive_class(task: str) -> int:
    """Class id F1/MCC count as positive: cola `acceptable`, mrpc `equivalent`, qqp `duplicate`."""
    positive = _task(task).positive_class
    if positive is None:
        raise ValueError(f"task {task!r} reports no F1/MCC, so it has no positive class")
    return positive


def needs_confusion(task: str) -> bool:
    return any(m in ("f1", "mcc") for m in task_metric_names(task))


def count_keys(task: str) -> list[str]:
    """Private (hidden, summable) logging keys of one task."""
    names = ["n", "invalid"]
    if is_regression(task):
        names += ["sx", "sy", "sxx", "syy", "sxy"]
    else:
        names += ["correct"]
        if needs_confusion(task):
            names += ["tp", "fp", "fn", "tn"]
    return [f"_hd_{task}_{name}" for name in names]


def pairs_key(task: str) -> str:
    return f"_hd_{task}_pairs"


def parse_number(text: str) -> float | None:
    """First number in the text ("3.8", " 3.80 </s>", "score: 4") or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group())
    return value if math.isfinite(value) else None


def default_label_words(task: str) -> list[str]:
    """glue_preprocess's label words (the GLUE task table), used when tasks.json lacks them."""
    return list(_task(task).label_words or [])


class GlueScorer:
    """Accumulates one evaluation's per-task counts from (task, prediction text, gold) triples."""

    def __init__(self, label_words: dict[str, list[str]] | None = None):
        self.label_words = {t: (label_words or {}).get(t) or default_label_words(t) for t in TASKS}
        self.counts: dict[str, float] = defaultdict(float)
        self.pairs: dict[str, list[list[float]]] = defaultdict(lambda: [[], []])

    def predicted_class(self, task: str, text: str) -> int | None:
        text = text.strip()
        words = self.label_words[task]
        if text in words:
            return words.index(text)
        # also accept the class id itself ("0", "1") as a target format
        if text.isdigit() and int(text) < max(len(words), 2):
            return int(text)
        return None

    def add(self, task: str, prediction: str, gold: float):
        _task(task)  # unknown task: ValueError naming the known ones
        c, key = self.counts, f"_hd_{task}_"
        c[key + "n"] += 1
        if is_regression(task):
            value = parse_number(prediction)
            if value is None:
                c[key + "invalid"] += 1
                value = INVALID_STSB
            for name, v in glue_metrics.moments([value], [gold]).items():
                if name != "n":
                    c[key + name] += float(v)
            self.pairs[task][0].append(value)
            self.pairs[task][1].append(float(gold))
            return
        gold = int(gold)
        pred = self.predicted_class(task, prediction)
        if pred is None:
            c[key + "invalid"] += 1
        c[key + "correct"] += float(pred == gold)
        if needs_confusion(task):
            if pred is None:  # reference `f1_score_with_invalid`: an invalid answer counts as wrong
                pred = 1 - gold if gold in (0, 1) else 0
            for name, v in glue_metrics.confusion_counts([pred], [gold], positive_class(task)).items():
                c[key + name] += v

    def logging_counts(self) -> dict[str, float]:
        """Every task's count keys (zeros included: workers must log identical keys to sum them)."""
        return {k: self.counts.get(k, 0.0) for t in TASKS for k in count_keys(t)}


def scores_from_counts(
    counts: dict[str, float], pairs: dict[str, list[list[float]]] | None = None
) -> dict[str, dict[str, float]]:
    """{task: {metric: value x 100, ...}} for tasks with at least one example."""
    out = {}
    for task in TASKS:
        get = lambda name, task=task: counts.get(f"_hd_{task}_{name}", 0.0)  # noqa: E731
        n = get("n")
        if n <= 0:
            continue
        scores = {}
        for metric in task_metric_names(task):
            if metric == "accuracy":
                value = get("correct") / n
            elif metric in ("f1", "mcc"):
                confusion = {k: get(k) for k in ("tp", "fp", "fn", "tn")}
                value = (glue_metrics.f1_from_counts if metric == "f1" else glue_metrics.mcc_from_counts)(**confusion)
            elif metric == "pearson":
                value = glue_metrics.pearson_from_moments(n, get("sx"), get("sy"), get("sxx"), get("syy"), get("sxy"))
                value = 0.0 if math.isnan(value) else value  # reference: NaN -> 0
            else:  # spearman: only from pairs (not summable)
                if not pairs or task not in pairs:
                    continue
                value = glue_metrics.spearman(*pairs[task])
                value = 0.0 if math.isnan(value) else value
            scores[metric] = 100.0 * value
        scores["n"] = n
        scores["invalid"] = get("invalid")
        out[task] = scores
    return out


def glue_average(per_task: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's mean metric (paper README: pairs averaged first)."""
    task_means = []
    for task, scores in per_task.items():
        values = [scores[m] for m in task_metric_names(task) if m in scores]
        if values:
            task_means.append(sum(values) / len(values))
    return sum(task_means) / len(task_means) if task_means else float("nan")


def format_table(per_task: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<6} {'n':>6} {'invalid':>7}  metrics"]
    for task, scores in per_task.items():
        metrics = "  ".join(f"{m} {scores[m]:.2f}" for m in task_metric_names(task) if m in scores)
        lines.append(f"{task:<6} {int(scores['n']):>6} {int(scores['invalid']):>7}  {metrics}")
    lines.append(f"{'avg':<6} {'':>6} {'':>7}  {glue_average(per_task):.2f}")
    return "\n".join(lines)
