"""Scoring generated MRQA answers: the official MRQA 2019 normalisation, EM and F1, and the reference's
choice of one answer per question among its context windows.

Official metric (mrqa/MRQA-Shared-Task-2019 `mrqa_official_eval.py` L20-60): lowercase, drop
`string.punctuation`, replace the words a/an/the by a space, collapse whitespace; EM = equality of the
normalised strings, F1 = bag-of-tokens F1 of the normalised strings (0 without overlap); both are the
maximum over the question's accepted `answers`, x100 per dataset.

Windows (allenai/hyperdecoders `mrqa_eval/eval.py` L80-93): every window of a question yields a generated
answer and its mean token NLL; the question's prediction is the non-empty answer with the lowest NLL, or
"" when every window answered "".

Per-window results travel as rows of floats (`ROW_FIELDS`), so they can be logged through fairseq's
concat-tensor meter and gathered across workers; questions are put together only at the end.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# one row per scored window: dataset index, question index, window index within the question, answer empty?,
# mean token NLL, EM (0/1), F1 ([0, 1]) of that window's answer
ROW_FIELDS = ("dataset", "question", "window", "empty", "nll", "em", "f1")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction, each maxed over the accepted answers (0, 0 when there are none)."""
    if not golds:
        return 0.0, 0.0
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)


def window_row(dataset: int, question: int, window: int, answer: str, nll: float, golds: Sequence[str]) -> list[float]:
    em, f = best_over_golds(answer, golds)
    return [float(dataset), float(question), float(window), float(answer.strip() == ""), float(nll), em, f]


def pick_window(windows: Sequence[tuple[str, float]]) -> str:
    """The question's prediction from its windows' (answer, mean NLL): the non-empty answer with the lowest
    NLL (the first such window on a tie, as the reference's `list.index(min(...))`), else ""."""
    answered = [(nll, i) for i, (answer, nll) in enumerate(windows) if answer.strip() != ""]
    if not answered:
        return ""
    return windows[min(answered)[1]][0]


def question_scores(rows: Iterable[Sequence[float]]) -> dict[int, tuple[int, float, float]]:
    """{question index: (dataset index, EM, F1)} from window rows (ROW_FIELDS), choosing per question as
    `pick_window` does. Rows of one question may come in any order (batches are sorted by length)."""
    # per question the smallest key wins: answered windows first, then lower NLL, then the earlier window
    best: dict[int, tuple[tuple[bool, float, float], int, float, float]] = {}
    for dataset, question, window, empty, nll, em, f in rows:
        q, key = int(question), (bool(empty), float(nll), float(window))
        if q not in best or key < best[q][0]:
            best[q] = (key, int(dataset), em, f)
    return {q: (d, em, f) for q, (_, d, em, f) in best.items()}


def dataset_scores(rows: Iterable[Sequence[float]], datasets: Sequence[str]) -> dict[str, dict[str, float]]:
    """{dataset name: {"em", "f1" (x100), "n" (questions)}} for every dataset with a scored question."""
    totals: dict[int, list[float]] = {}
    for dataset, em, f in question_scores(rows).values():
        t = totals.setdefault(dataset, [0.0, 0.0, 0.0])
        t[0] += 1
        t[1] += em
        t[2] += f
    return {
        datasets[d]: {"em": 100.0 * em / n, "f1": 100.0 * f / n, "n": n} for d, (n, em, f) in sorted(totals.items())
    }


def macro_average(per_dataset: dict[str, dict[str, float]], names: Iterable[str], metric: str) -> float:
    """Mean of `metric` over the datasets of `names` that were scored (MRQA README: macro-average)."""
    values = [per_dataset[n][metric] for n in names if n in per_dataset]
    return sum(values) / len(values) if values else float("nan")
