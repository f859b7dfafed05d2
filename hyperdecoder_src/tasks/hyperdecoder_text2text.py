"""`hyperdecoder_text2text`: the multi-task text-to-text task on a mixture of summarisation and classification
tasks (`python -m seq2seq_preprocess.mixture`: XSum, CNN/DM, WikiLingua, ANLI, ART[, MNLI]). Validation
generates every example's answer with its task's decoding settings (tasks.json `generation`, the dataset
table's) and logs per task ROUGE-1/2/L/Lsum (summaries; the scorer of `robustft_experiments.seq2seq_eval`)
or accuracy (exact string match of the class answer, as the reference), and their average `t2t_avg`."""

import json
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.logging import metrics
from fairseq.tasks import register_task

from robustft_common.validation import require

from .multitask_text2text import MultitaskText2TextConfig, MultitaskText2TextTask, json_flag, select_rows

logger = logging.getLogger(__name__)

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class HyperdecoderText2TextConfig(MultitaskText2TextConfig):
    hyperdecoder_eval_text2text: bool = field(
        default=False,
        metadata={
            "help": "generate during validation and log per task ROUGE (<task>_rouge1/2/L/Lsum) or accuracy "
            "(<task>_accuracy) and their average (t2t_avg)"
        },
    )
    hyperdecoder_eval_args: str = field(
        default="{}",
        metadata={
            "help": "generation args (JSON) that replace every task's own decoding settings (tasks.json "
            "`generation`), e.g. '{\"beam\": 1}' for fast greedy validation"
        },
    )


def rouge_f(prediction: str, reference: str) -> Dict[str, float]:
    """ROUGE-1/2/L/Lsum F x100 of one summary, with the summarisation evaluation's scorer and conventions."""
    from robustft_experiments.seq2seq_eval import rouge  # rouge-score, stemmed; sentences for Lsum

    return rouge([prediction], [reference])


def count_keys(task: str, kind: str) -> List[str]:
    names = ["n", "correct", "invalid"] if kind == "classification" else ["n", *ROUGE_METRICS]
    return [f"_t2t_{task}_{name}" for name in names]


class Text2TextScorer:
    """Summable per-task counts of one evaluation (and the eval script's per-example records)."""

    def __init__(self, tasks: Dict[str, dict]):
        self.tasks = tasks
        self.counts: Dict[str, float] = {k: 0.0 for t, info in tasks.items() for k in count_keys(t, info["kind"])}

    def add(self, task: str, prediction: str, reference: str) -> Dict[str, float]:
        info, key = self.tasks[task], f"_t2t_{task}_"
        self.counts[key + "n"] += 1
        if info["kind"] == "classification":
            answer = prediction.strip()
            self.counts[key + "correct"] += float(answer == reference.strip())
            self.counts[key + "invalid"] += float(answer not in info.get("labels", []))
            return {"correct": float(answer == reference.strip())}
        scores = rouge_f(prediction, reference)
        for metric in ROUGE_METRICS:
            self.counts[key + metric] += scores[metric]
        return scores


def scores_from_counts(tasks: Dict[str, dict], counts: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value x100, "n": examples}} for every task with examples."""
    out = {}
    for task, info in tasks.items():
        n = counts.get(f"_t2t_{task}_n", 0.0)
        if n <= 0:
            continue
        if info["kind"] == "classification":
            scores = {"accuracy": 100.0 * counts[f"_t2t_{task}_correct"] / n, "invalid": counts[f"_t2t_{task}_invalid"]}
        else:
            scores = {m: counts[f"_t2t_{task}_{m}"] / n for m in ROUGE_METRICS}
        out[task] = {**scores, "n": n}
    return out


def task_mean(task_scores: Dict[str, float]) -> float:
    """A task's mean over its metrics (the reference's average_metrics averages every metric key)."""
    values = [v for k, v in task_scores.items() if k in ROUGE_METRICS or k == "accuracy"]
    return sum(values) / len(values)


def average(per_task: Dict[str, Dict[str, float]]) -> float:
    means = [task_mean(s) for s in per_task.values()]
    return sum(means) / len(means) if means else float("nan")


@register_task("hyperdecoder_text2text", dataclass=HyperdecoderText2TextConfig)
class HyperdecoderText2TextTask(MultitaskText2TextTask):
    """Batches of an evaluated split carry `t2t_task` (index into `task_names`) and `t2t_ref` (index into
    `refs`, the ROUGE references / class targets of <split>.ref.jsonl)."""

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.tasks_info: Dict[str, dict] = self.tasks_meta.get("tasks", {})
        self.task_names: List[str] = list(self.tasks_info)
        self.refs: List[str] = []
        self.generators: Dict[str, object] = {}

    def eval_enabled(self) -> bool:
        return self.cfg.hyperdecoder_eval_text2text

    def read_part_metadata(
        self, part: str, size: int, data_dir: Optional[str] = None, train: bool = False
    ) -> Dict[str, np.ndarray]:
        meta = super().read_part_metadata(part, size, data_dir, train)
        path = os.path.join(data_dir or self.data_dir, f"{part}.ref.jsonl")
        if train or not self.eval_enabled():
            return meta
        require(
            "task" in meta and os.path.exists(path),
            "--hyperdecoder-eval-text2text",
            f"needs {part}.task and {part}.ref.jsonl beside the binarized split (python -m seq2seq_preprocess.mixture)",
        )
        unknown = sorted(set(meta["task"]) - set(self.task_names))
        require(
            not unknown, "--hyperdecoder-eval-text2text", f"{part}.task names tasks {unknown} absent from tasks.json"
        )
        with open(path, encoding="utf-8") as f:
            refs = [json.loads(line)["ref"] for line in f]
        require(len(refs) == size, "--task", f"{path} has {len(refs)} lines but {part} holds {size} examples")
        meta["t2t_ref"] = np.arange(len(self.refs), len(self.refs) + size, dtype=np.int64)
        meta["t2t_task"] = np.asarray([self.task_names.index(t) for t in meta["task"]], dtype=np.int64)
        self.refs.extend(refs)
        return meta

    # ---------------------------------------------------------------- generation per task
    def setup_eval(self, model):
        """One generator per task: its tasks.json decoding settings, overridden by --hyperdecoder-eval-args."""
        overrides = json_flag("--hyperdecoder-eval-args", self.cfg.hyperdecoder_eval_args)
        for task, info in self.tasks_info.items():
            settings = {**info.get("generation", {}), **overrides}
            if "max_len_b" in overrides:  # a shorter limit given for validation caps the task's min_len
                settings["min_len"] = min(settings.get("min_len", 1), overrides["max_len_b"])
            self.generators[task] = self.build_generator([model], Namespace(**settings))
        self.bpe = self._build_bpe()

    def new_scorer(self) -> Text2TextScorer:
        return Text2TextScorer(self.tasks_info)

    def score_batch(self, sample, model, scorer: Text2TextScorer, records: Optional[list] = None) -> Text2TextScorer:
        """Generate each example's answer with its task's generator; add it to `scorer` (and (id, task,
        prediction, reference) to `records`)."""
        if "t2t_task" not in sample:
            raise ValueError("--hyperdecoder-eval-text2text: this batch has no task ids; the split needs <split>.task")
        task_ids = sample["t2t_task"]
        for t in torch.unique(task_ids).tolist():
            task = self.task_names[t]
            rows = (task_ids == t).nonzero().view(-1)
            part = select_rows(sample, rows, task_ids.numel())
            for i, (prediction, _) in enumerate(self.generate(part, model, self.generators[task])):
                reference = self.refs[int(part["t2t_ref"][i])]
                scorer.add(task, prediction, reference)
                if records is not None:
                    records.append((int(part["id"][i]), task, prediction, reference))
                if self.cfg.hyperdecoder_print_samples and i == 0:
                    logger.info("example %s prediction %r reference %r", task, prediction, reference)
        return scorer

    # ---------------------------------------------------------------- offline evaluation (scripts/hyperdecoder_eval.py)
    EVAL_FLAG = "hyperdecoder_eval_text2text"

    def report(self, scorer: Text2TextScorer) -> dict:
        per_task = scores_from_counts(self.tasks_info, scorer.counts)
        return {"tasks": per_task, "avg": average(per_task)}

    def format_report(self, report: dict) -> str:
        lines = [f"{'task':<12} {'n':>6}  metrics"]
        for task, s in report["tasks"].items():
            shown = "  ".join(f"{k} {v:.2f}" for k, v in s.items() if k in ROUGE_METRICS or k == "accuracy")
            lines.append(f"{task:<12} {int(s['n']):>6}  {shown}")
        lines.append(f"{'avg':<12} {'':>6}  {report['avg']:.2f}")
        return "\n".join(lines)

    def write_predictions(self, records, path):
        """One JSON line per example, in id order: id, task, prediction, reference."""
        with open(path, "w", encoding="utf-8") as f:
            for i, task, prediction, reference in sorted(records):
                row = {"id": i, "task": task, "prediction": prediction, "reference": reference}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # ---------------------------------------------------------------- validation metrics
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.hyperdecoder_eval_text2text:
            # every task's keys, zeros included: workers must log identical keys to sum them
            logging_output.update(self.score_batch(sample, model, self.new_scorer()).counts)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.cfg.hyperdecoder_eval_text2text:
            return
        keys = [k for t, info in self.tasks_info.items() for k in count_keys(t, info["kind"])]
        totals = {k: sum(float(log.get(k, 0)) for log in logging_outputs) for k in keys}
        if not any(totals[f"_t2t_{t}_n"] for t in self.tasks_info):
            return
        for k, v in totals.items():
            metrics.log_scalar_sum(k, v)

        def scores(meters):
            return scores_from_counts(self.tasks_info, {k: meters[k].sum for k in keys if k in meters})

        for task, values in scores_from_counts(self.tasks_info, totals).items():
            for metric in values:
                if metric not in ("n", "invalid"):
                    metrics.log_derived(
                        f"{task}_{metric}", lambda m, t=task, k=metric: scores(m).get(t, {}).get(k, float("nan"))
                    )
        metrics.log_derived("t2t_avg", lambda m: average(scores(m)))
