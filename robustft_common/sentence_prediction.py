"""Base of every sentence-prediction criterion in the plugin.

Same loss and the same logged metric names as fairseq's stock `sentence_prediction` (loss in base 2,
accuracy in %, mcc / f1 / acc_and_f1 / pearson / spearman / pearson_and_spearman x100 when the
`--report-*` flags ask), but every metric except Spearman is reduced from summable counts, so it is
also right with several data-parallel workers (the stock criterion crashes there). Subclasses add a
regulariser by overriding `extra_terms`; every extra logged value is either a per-sentence sum listed
in `SENTENCE_MEAN_KEYS` or a `<name>_num` / `<name>_den` pair logged as the ratio `<name>`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)
from fairseq.logging import metrics
from fairseq.logging.meters import safe_round

from robustft_common import glue_metrics, mixout
from robustft_common.utils import log_ratio_pairs
from robustft_common.utils import logged_sum as _sum
from robustft_common.validation import require_num_classes

_MOMENT_KEYS = ("n", "sx", "sy", "sxx", "syy", "sxy")
_CONFUSION_KEYS = ("tp", "fp", "fn", "tn")


def _multi_process() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class RobustSentencePredictionCriterion(SentencePredictionCriterion):
    """Stock sentence prediction with data-parallel-safe metrics and a hook for extra loss terms."""

    SENTENCE_MEAN_KEYS: tuple[str, ...] = ()

    def __init__(self, cfg: SentencePredictionConfig, task):
        super().__init__(cfg, task)
        self.report_counts = cfg.report_mcc or cfg.report_acc_and_f1
        # MCC/F1 treat the label "1" as positive (CoLA, MRPC, QQP), whatever its class id; class ids
        # follow the label dictionary, which fairseq sorts by frequency.
        label_dict = self.label_dict
        if not self.regression_target and label_dict is not None:
            task_cfg = getattr(task, "cfg", None)
            require_num_classes(label_dict, getattr(task_cfg, "num_classes", None), getattr(task_cfg, "data", "DATA"))
        positive = label_dict.index("1") if label_dict is not None and "1" in label_dict.indices else None
        self.positive_class = positive - label_dict.nspecial if positive is not None else 1
        # `--mixout-*` (robustft_common/mixout.py): the model carries Mixout; checked at the first training step
        self.mixout = mixout.mixout_settings(cfg)
        self._mixout_checked = False

    # -- hooks -----------------------------------------------------------------------------------
    def classification_logits(self, model, sample) -> torch.Tensor:
        logits, _ = model(
            **sample["net_input"], features_only=True, classification_head_name=self.classification_head_name
        )
        return logits

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed over sentences, in fp32: NLL for classification, MSE for regression."""
        if self.regression_target:
            return F.mse_loss(logits.view(-1).float(), targets.float(), reduction="sum")
        return F.nll_loss(F.log_softmax(logits, dim=-1, dtype=torch.float32), targets, reduction="sum")

    def extra_terms(self, model, sample, logits, targets) -> tuple[torch.Tensor | None, dict]:
        """Return (summed extra loss or None, extra logging entries). Override in subclasses."""
        return None, {}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, model, sample, reduce=True):
        assert hasattr(model, "classification_heads") and self.classification_head_name in model.classification_heads, (
            f"model has no classification head {self.classification_head_name!r}; pass "
            f"--classification-head-name / --num-classes for --task sentence_prediction"
        )
        if model.training and not self._mixout_checked:
            mixout.require_installed(model, self.mixout)
            self._mixout_checked = True
        logits = self.classification_logits(model, sample)
        targets = model.get_targets(sample, [logits]).view(-1)
        sample_size = targets.numel()
        loss = self.task_loss(logits, targets)
        extra_loss, logging_output = self.extra_terms(model, sample, logits, targets)
        if extra_loss is not None:
            loss = loss + extra_loss
        logging_output.update(
            loss=loss.data, ntokens=sample["ntokens"], nsentences=sample_size, sample_size=sample_size
        )
        logging_output.update(self.metric_counts(logits.detach(), targets, model.training))
        return loss, sample_size, logging_output

    def metric_counts(self, logits, targets, training: bool) -> dict:
        out = {}
        if self.regression_target:
            if self.report_pearson_and_spearman:
                preds = logits.view(-1).double()
                y = targets.double()
                values = (preds.numel(), preds.sum(), y.sum(), (preds * preds).sum(), (y * y).sum(), (preds * y).sum())
                out.update({f"_pearson_{k}": v for k, v in zip(_MOMENT_KEYS, values)})
                if not training and not _multi_process():
                    # Spearman needs the full ranking: single-process validation only.
                    out["_spearman_pred"] = preds.cpu().tolist()
                    out["_spearman_targ"] = y.cpu().tolist()
            return out
        preds = logits.argmax(dim=-1)
        out["ncorrect"] = (preds == targets).sum()
        if self.report_counts:
            p, t = preds == self.positive_class, targets == self.positive_class
            out.update(_tp=(p & t).sum(), _fp=(p & ~t).sum(), _fn=(~p & t).sum(), _tn=(~p & ~t).sum())
        return out

    # -- reduction -------------------------------------------------------------------------------
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        loss_sum = _sum(logging_outputs, "loss")
        sample_size = _sum(logging_outputs, "sample_size")
        nsentences = _sum(logging_outputs, "nsentences")
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        if logging_outputs and "ncorrect" in logging_outputs[0]:
            ncorrect = _sum(logging_outputs, "ncorrect")
            metrics.log_scalar("accuracy", 100.0 * ncorrect / nsentences, nsentences, round=1)
        for key in cls.SENTENCE_MEAN_KEYS:
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, _sum(logging_outputs, key) / nsentences, nsentences, round=6)
        log_ratio_pairs(logging_outputs)
        keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()

        # Metrics over a whole validation set / log interval: accumulate sums across batches and
        # derive the metric from the totals (an average of per-batch MCC would be wrong).
        if "_tp" in keys:
            for k in _CONFUSION_KEYS:
                metrics.log_scalar_sum(f"_{k}", _sum(logging_outputs, f"_{k}"))
            metrics.log_derived(
                "mcc", lambda m: safe_round(100 * glue_metrics.mcc_from_counts(**_totals(m, "_", _CONFUSION_KEYS)), 1)
            )
            metrics.log_derived(
                "f1", lambda m: safe_round(100 * glue_metrics.f1_from_counts(**_totals(m, "_", _CONFUSION_KEYS)), 1)
            )
            metrics.log_derived(
                "acc_and_f1", lambda m: safe_round(50 * _acc_plus_f1(_totals(m, "_", _CONFUSION_KEYS)), 1)
            )
        if "_pearson_n" in keys:
            for k in _MOMENT_KEYS:
                metrics.log_scalar_sum(f"_pearson_{k}", _sum(logging_outputs, f"_pearson_{k}"))
            metrics.log_derived(
                "pearson",
                lambda m: safe_round(
                    100 * glue_metrics.pearson_from_moments(**_totals(m, "_pearson_", _MOMENT_KEYS)), 1
                ),
            )
            preds = [p for log in logging_outputs for p in log.get("_spearman_pred", [])]
            if preds:
                targs = [t for log in logging_outputs for t in log.get("_spearman_targ", [])]
                metrics.log_concat_tensor("_spearman_pred", torch.tensor(preds, dtype=torch.float64))
                metrics.log_concat_tensor("_spearman_targ", torch.tensor(targs, dtype=torch.float64))
                metrics.log_derived("spearman", lambda m: safe_round(100 * _spearman(m), 1))
                metrics.log_derived(
                    "pearson_and_spearman",
                    lambda m: safe_round(
                        50
                        * (glue_metrics.pearson_from_moments(**_totals(m, "_pearson_", _MOMENT_KEYS)) + _spearman(m)),
                        1,
                    ),
                )


def _totals(meters, prefix, keys) -> dict[str, float]:
    return {k: meters[f"{prefix}{k}"].sum for k in keys}


def _acc_plus_f1(counts) -> float:
    total = sum(counts.values())
    acc = (counts["tp"] + counts["tn"]) / total if total else 0.0
    return acc + glue_metrics.f1_from_counts(**counts)


def _spearman(meters) -> float:
    return glue_metrics.spearman(meters["_spearman_pred"].tensor.numpy(), meters["_spearman_targ"].tensor.numpy())
