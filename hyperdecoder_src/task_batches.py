"""Index bookkeeping of the multi-task tasks: the seeded dev-set halving of `--split-validation-test` and the
one-task-per-batch schedule of `--one-task-per-batch`. Pure functions over index arrays (tested alone)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def split_halves(n: int, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) example indices, each in file order: a seeded `torch.randperm` of the examples (or of
    the groups, in order of first appearance, when `groups` is given) whose first floor(n/2) are validation.
    Without groups this is the reference's `get_half_validation_indices` (allenai/hyperdecoders
    `data/tasks.py`; seed 42): the same rows land in each half given the same row order."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=generator).numpy()
        first = np.sort(order[: n // 2])
        second = np.sort(order[n // 2 :])
        return first, second
    keys, inverse = _first_appearance_ids(groups)
    order = torch.randperm(len(keys), generator=generator).numpy()
    in_first = np.zeros(len(keys), dtype=bool)
    in_first[order[: len(keys) // 2]] = True
    mask = in_first[inverse]
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def _first_appearance_ids(groups: np.ndarray) -> tuple[list, np.ndarray]:
    ids: dict = {}
    inverse = np.fromiter((ids.setdefault(g, len(ids)) for g in groups), dtype=np.int64, count=len(groups))
    return list(ids), inverse


def task_probabilities(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """p(task) ~ (size / total)^(1/T) (rabeehk/hyperformer `MultiTaskBatchSampler.generate_tasks_distribution`)."""
    total = sum(sizes.values())
    weights = {t: (n / total) ** (1.0 / temperature) for t, n in sizes.items() if n > 0}
    norm = sum(weights.values())
    return {t: w / norm for t, w in weights.items()}


def schedule_task_batches(
    batches: Mapping[str, Sequence[np.ndarray]],
    sizes: Mapping[str, int],
    temperature: float,
    num_shards: int,
    rng: np.random.RandomState,
) -> list[np.ndarray]:
    """One epoch of batches in blocks of `num_shards` consecutive batches of one task (fairseq hands batch
    k*num_shards + r to worker r, so every worker of a step sees the same task, as in hyperformer).

    The epoch has as many batches as the tasks' batches together (rounded up to whole blocks); each
    block's task is drawn from `task_probabilities`; a task's batches are taken in a shuffled order and
    reshuffled when used up, so at temperature 1 each batch is used about once per epoch.
    """
    tasks = [t for t in sorted(batches) if len(batches[t]) > 0 and sizes.get(t, 0) > 0]
    if not tasks:
        return []
    probs = task_probabilities({t: sizes[t] for t in tasks}, temperature)
    blocks = math.ceil(sum(len(batches[t]) for t in tasks) / num_shards)
    draws = rng.choice(len(tasks), size=blocks, p=[probs[t] for t in tasks])
    queues: dict[str, list[int]] = {t: [] for t in tasks}
    out = []
    for d in draws:
        task = tasks[d]
        for _ in range(num_shards):
            if not queues[task]:
                queues[task] = list(rng.permutation(len(batches[task])))
            out.append(batches[task][queues[task].pop()])
    return out
