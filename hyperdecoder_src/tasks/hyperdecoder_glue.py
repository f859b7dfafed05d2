"""`hyperdecoder_glue`: the multi-task text-to-text task on glue_preprocess's GLUE data, whose validation
generates each example's answer and logs every task's GLUE metric plus their average."""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
from fairseq.logging import metrics
from fairseq.tasks import register_task

from robustft_common.validation import require

from .. import glue_scoring
from ..glue_scoring import TASKS, GlueScorer, count_keys, pairs_key
from .multitask_text2text import MultitaskText2TextConfig, MultitaskText2TextTask, distributed_world_size, read_lines

logger = logging.getLogger(__name__)


@dataclass
class HyperdecoderGlueConfig(MultitaskText2TextConfig):
    hyperdecoder_eval_glue: bool = field(
        default=False,
        metadata={
            "help": "generate during validation and log each task's GLUE metric "
            "(<task>_<metric>) and their average (glue_avg)"
        },
    )


@register_task("hyperdecoder_glue", dataclass=HyperdecoderGlueConfig)
class HyperdecoderGlueTask(MultitaskText2TextTask):
    """Batches of a split with <split>.task / <split>.gold carry `glue_task` (index into TASKS) and
    `glue_gold` (class id or STS-B score)."""

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.label_words = {t: m.get("labels") for t, m in self.tasks_meta.get("tasks", {}).items()}

    def eval_enabled(self) -> bool:
        return self.cfg.hyperdecoder_eval_glue

    def read_part_metadata(
        self, part: str, size: int, data_dir: Optional[str] = None, train: bool = False
    ) -> Dict[str, np.ndarray]:
        meta = super().read_part_metadata(part, size, data_dir, train)
        gold_file = os.path.join(data_dir or self.data_dir, f"{part}.gold")
        if "task" not in meta or not os.path.exists(gold_file):
            require(
                not self.cfg.hyperdecoder_eval_glue or train,
                "--hyperdecoder-eval-glue",
                f"needs {part}.task and {part}.gold beside the binarized split (glue_preprocess "
                "--format text2text writes them)",
            )
            return meta
        names = meta["task"]
        unknown = sorted(set(names) - set(TASKS))
        require(
            not unknown,
            "--hyperdecoder-eval-glue",
            f"{part}.task names unknown tasks {unknown}; expected text2text names {', '.join(TASKS)}",
        )
        golds = read_lines(gold_file)
        require(len(golds) == size, "--task", f"{gold_file} has {len(golds)} lines but {part} holds {size} examples")
        meta["glue_task"] = np.asarray([TASKS.index(n) for n in names], dtype=np.int64)
        meta["glue_gold"] = np.asarray([float(g) for g in golds], dtype=np.float64)
        return meta

    # ---------------------------------------------------------------- offline evaluation (scripts/hyperdecoder_eval.py)
    EVAL_FLAG = "hyperdecoder_eval_glue"

    def new_scorer(self) -> GlueScorer:
        return GlueScorer(self.label_words)

    def report(self, scorer: GlueScorer) -> dict:
        per_task = glue_scoring.scores_from_counts(scorer.counts, scorer.pairs)
        return {"tasks": per_task, "avg": glue_scoring.glue_average(per_task)}

    def format_report(self, report: dict) -> str:
        return glue_scoring.format_table(report["tasks"])

    def write_predictions(self, records, path):
        """`id<TAB>task<TAB>prediction<TAB>gold` per example, in id order."""
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{i}\t{t}\t{p}\t{g}\n" for i, t, p, g in sorted(records))

    def score_batch(self, sample, model, scorer: GlueScorer, records=None):
        """Generate answers for one batch and add them to `scorer` (and (id, task, prediction, gold)
        tuples to `records` when given)."""
        if "glue_task" not in sample:
            raise ValueError(
                "--hyperdecoder-eval-glue: this batch has no task ids; the split needs "
                "<split>.task and <split>.gold files"
            )
        for i, (prediction, _) in enumerate(self.generate(sample, model)):
            task = TASKS[int(sample["glue_task"][i])]
            scorer.add(task, prediction, float(sample["glue_gold"][i]))
            if records is not None:
                records.append((int(sample["id"][i]), task, prediction, float(sample["glue_gold"][i])))
            if self.cfg.hyperdecoder_print_samples and i == 0:
                logger.info("example %s prediction %r gold %s", task, prediction, float(sample["glue_gold"][i]))
        return scorer

    # ---------------------------------------------------------------- validation metrics
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.hyperdecoder_eval_glue:
            scorer = self.score_batch(sample, model, GlueScorer(self.label_words))
            logging_output.update(scorer.logging_counts())
            # Spearman needs the pairs: exact in one process; lists cannot be summed across workers
            if distributed_world_size() == 1:
                for task, (preds, golds) in scorer.pairs.items():
                    logging_output[pairs_key(task)] = (preds, golds)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.cfg.hyperdecoder_eval_glue:
            return
        seen = []
        for task in TASKS:
            keys = count_keys(task)
            totals = {k: sum(float(log.get(k, 0)) for log in logging_outputs) for k in keys}
            for k, v in totals.items():
                metrics.log_scalar_sum(k, v)
            for log in logging_outputs:
                if pairs_key(task) in log and len(log[pairs_key(task)][0]):
                    # a built-in meter: fairseq checkpoints the meters and restores them by class name
                    metrics.log_concat_tensor(
                        pairs_key(task), torch.tensor(list(zip(*log[pairs_key(task)])), dtype=torch.float64)
                    )
            if totals[f"_hd_{task}_n"] > 0:
                seen.append(task)
        if not seen:
            return

        def scores(meters):
            counts = {k: meters[k].sum for t in TASKS for k in count_keys(t) if k in meters}
            pairs = {
                t: (meters[pairs_key(t)].tensor[:, 0].tolist(), meters[pairs_key(t)].tensor[:, 1].tolist())
                for t in TASKS
                if pairs_key(t) in meters and meters[pairs_key(t)].tensor is not None
            }
            return glue_scoring.scores_from_counts(counts, pairs)

        for task in seen:
            for metric in glue_scoring.task_metric_names(task):
                metrics.log_derived(
                    f"{task}_{metric}", lambda meters, t=task, m=metric: scores(meters).get(t, {}).get(m, float("nan"))
                )
        metrics.log_derived("glue_avg", lambda meters: glue_scoring.glue_average(scores(meters)))
