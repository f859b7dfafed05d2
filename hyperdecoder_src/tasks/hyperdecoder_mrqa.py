"""`hyperdecoder_mrqa`: the multi-task text-to-text task on `python -m seq2seq_preprocess.mrqa` data (one example
per question and context window). Validation generates every window's answer and its mean token NLL, picks
per question the non-empty answer with the lowest NLL, and logs the official EM/F1 per dataset plus their
macro-averages in-domain, out-of-domain and overall (`hyperdecoder_src/mrqa_scoring.py`)."""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.logging import metrics
from fairseq.tasks import register_task

from robustft_common.validation import require

from .. import mrqa_scoring
from .multitask_text2text import MultitaskText2TextConfig, MultitaskText2TextTask

logger = logging.getLogger(__name__)

ROWS_KEY = "_mrqa_rows"  # hidden meter: one row (mrqa_scoring.ROW_FIELDS) per scored window


@dataclass
class HyperdecoderMrqaConfig(MultitaskText2TextConfig):
    hyperdecoder_eval_mrqa: bool = field(
        default=False,
        metadata={
            "help": "generate every window's answer during validation and log EM/F1 per dataset (<key>_em, "
            "<key>_f1) and their macro-averages (mrqa_in_*, mrqa_out_*, mrqa_em, mrqa_f1)"
        },
    )
    hyperdecoder_eval_args: str = field(
        default='{"beam": 1, "max_len_a": 0, "max_len_b": 64}',
        metadata={"help": "generation args (JSON) for validation; the reference decodes greedily, answers <= 64"},
    )


class MrqaScorer:
    """Window rows of one evaluation, and (for the eval script) every window's (qid, answer, NLL)."""

    def __init__(self):
        self.rows: List[List[float]] = []
        self.records: List[tuple] = []


@register_task("hyperdecoder_mrqa", dataclass=HyperdecoderMrqaConfig)
class HyperdecoderMrqaTask(MultitaskText2TextTask):
    """Batches of an evaluated split carry `mrqa_dataset`, `mrqa_question` and `mrqa_window` (indices into
    `dataset_names`, `questions` and the question's windows) from <split>.mrqa.jsonl."""

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        datasets = self.tasks_meta.get("datasets", {})
        self.dataset_names: List[str] = list(datasets)
        self.dataset_keys = {name: info.get("key", name.lower()) for name, info in datasets.items()}
        self.domains = {name: info.get("domain", "in") for name, info in datasets.items()}
        self.questions: List[str] = []  # qid per question index (every split loaded so far)
        self.question_index: Dict[str, int] = {}
        self.answers: List[List[str]] = []
        self._cached: Optional[tuple] = None

    def eval_enabled(self) -> bool:
        return self.cfg.hyperdecoder_eval_mrqa

    @staticmethod
    def logging_outputs_can_be_summed(criterion) -> bool:
        # validation logs per-window rows (a tensor per batch): gather them whole across workers
        # (trainer.py L1405: all_gather_list instead of summing)
        return False

    # ---------------------------------------------------------------- metadata
    def read_part_metadata(
        self, part: str, size: int, data_dir: Optional[str] = None, train: bool = False
    ) -> Dict[str, np.ndarray]:
        meta = super().read_part_metadata(part, size, data_dir, train)
        path = os.path.join(data_dir or self.data_dir, f"{part}.mrqa.jsonl")
        if train or not os.path.exists(path):
            require(
                train or not self.cfg.hyperdecoder_eval_mrqa,
                "--hyperdecoder-eval-mrqa",
                f"needs {path} (python -m seq2seq_preprocess.mrqa writes it)",
            )
            return meta
        dataset, question, window = [], [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                row = json.loads(line)
                name = row["dataset"]
                require(
                    name in self.dataset_names,
                    "--task hyperdecoder_mrqa",
                    f"{path}:{lineno}: dataset {name!r} is not listed in tasks.json ({self.dataset_names})",
                )
                dataset.append(self.dataset_names.index(name))
                question.append(self._question(row["qid"], row["answers"]))
                window.append(row["window"])
        require(len(dataset) == size, "--task", f"{path} has {len(dataset)} lines but {part} holds {size} examples")
        meta.update(
            mrqa_dataset=np.asarray(dataset, dtype=np.int64),
            mrqa_question=np.asarray(question, dtype=np.int64),
            mrqa_window=np.asarray(window, dtype=np.int64),
        )
        return meta

    def _question(self, qid: str, answers: List[str]) -> int:
        if qid not in self.question_index:
            self.question_index[qid] = len(self.questions)
            self.questions.append(qid)
            self.answers.append(list(answers))
        return self.question_index[qid]

    def group_keys(self, meta):
        # --split-validation-test keeps every window of a question in the same half
        return meta.get("mrqa_question")

    # ---------------------------------------------------------------- scoring
    def new_scorer(self) -> MrqaScorer:
        return MrqaScorer()

    def score_batch(self, sample, model, scorer: MrqaScorer, records: Optional[list] = None) -> MrqaScorer:
        """Generate every window's answer; add its row (and its (qid, answer, NLL) to `records`)."""
        if "mrqa_question" not in sample:
            raise ValueError(
                "--hyperdecoder-eval-mrqa: this batch has no question ids; the split needs <split>.mrqa.jsonl"
            )
        for i, (answer, hypo) in enumerate(self.generate(sample, model)):
            q = int(sample["mrqa_question"][i])
            nll = -float(hypo["positional_scores"].float().mean())  # mean over the answer's tokens and </s>
            row = mrqa_scoring.window_row(
                int(sample["mrqa_dataset"][i]), q, int(sample["mrqa_window"][i]), answer, nll, self.answers[q]
            )
            scorer.rows.append(row)
            if records is not None:
                records.append((self.questions[q], int(sample["mrqa_window"][i]), answer, nll))
            if self.cfg.hyperdecoder_print_samples and i == 0:
                logger.info("window %s answer %r nll %.3f gold %s", self.questions[q], answer, nll, self.answers[q])
        return scorer

    def scores(self, rows) -> Dict[str, Dict[str, float]]:
        """Per dataset {"em", "f1", "n"} plus the averages "in", "out" and "all" (each {"em", "f1"})."""
        per = mrqa_scoring.dataset_scores(rows, self.dataset_names)
        groups = {
            "in": [n for n in per if self.domains[n] == "in"],
            "out": [n for n in per if self.domains[n] == "out"],
            "all": list(per),
        }
        for group, names in groups.items():
            if names:
                per[group] = {m: mrqa_scoring.macro_average(per, names, m) for m in ("em", "f1")}
        return per

    def metric_names(self, scores) -> Dict[str, tuple]:
        """Logged name -> (scores key, metric): <key>_em/_f1 per dataset, mrqa_{in,out}_{em,f1}, mrqa_{em,f1}."""
        names = {}
        for key, values in scores.items():
            prefix = {"in": "mrqa_in", "out": "mrqa_out", "all": "mrqa"}.get(key) or self.dataset_keys[key]
            for metric in ("em", "f1"):
                if metric in values:
                    names[f"{prefix}_{metric}"] = (key, metric)
        return names

    # ---------------------------------------------------------------- offline evaluation (scripts/hyperdecoder_eval.py)
    EVAL_FLAG = "hyperdecoder_eval_mrqa"

    def report(self, scorer: MrqaScorer) -> dict:
        return {"datasets": self.scores(scorer.rows), "windows": len(scorer.rows)}

    def format_report(self, report: dict) -> str:
        lines = [f"{'dataset':<22} {'n':>7} {'EM':>7} {'F1':>7}"]
        for name, s in report["datasets"].items():
            label = {"in": "in-domain avg", "out": "out-of-domain avg", "all": "avg"}.get(name, name)
            n = f"{int(s['n']):>7}" if "n" in s else f"{'':>7}"
            lines.append(f"{label:<22} {n} {s['em']:>7.2f} {s['f1']:>7.2f}")
        return "\n".join(lines)

    def write_predictions(self, records, path):
        """{qid: [[answer, mean NLL], ...]} with the windows in order: the reference's predicted_answers.json
        (allenai/hyperdecoders mrqa_eval/eval.py reads it)."""
        windows: Dict[str, Dict[int, list]] = {}
        for qid, window, answer, nll in records:
            windows.setdefault(qid, {})[window] = [answer, nll]
        out = {qid: [w[k] for k in sorted(w)] for qid, w in windows.items()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)

    def _final_scores(self, rows: torch.Tensor):
        # every derived metric reads the same rows: score them once per evaluation
        if self._cached is None or self._cached[0] is not rows:
            self._cached = (rows, self.scores(rows.tolist()))
        return self._cached[1]

    # ---------------------------------------------------------------- validation metrics
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.hyperdecoder_eval_mrqa:
            scorer = self.score_batch(sample, model, self.new_scorer())
            logging_output[ROWS_KEY] = torch.tensor(scorer.rows, dtype=torch.float64).view(-1, 7)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        parts = [log[ROWS_KEY] for log in logging_outputs if ROWS_KEY in log and len(log[ROWS_KEY])]
        if not parts:
            return
        # a built-in meter: fairseq checkpoints the meters and restores them by class name
        metrics.log_concat_tensor(ROWS_KEY, torch.cat(parts).cpu())
        batch_scores = self.scores(torch.cat(parts).tolist())

        def final(meters, key, metric):
            return self._final_scores(meters[ROWS_KEY].tensor).get(key, {}).get(metric, float("nan"))

        for name, (key, metric) in self.metric_names(batch_scores).items():
            metrics.log_derived(name, lambda meters, k=key, m=metric: final(meters, k, m))
