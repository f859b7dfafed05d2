"""R-Drop (Liang et al., NeurIPS 2021): two training passes of the same batch with independent dropout,
the task loss on both, plus alpha/2 * the symmetric KL of their output distributions.

Scale (the paper's loss, which the authors' fairseq criterions implement; dropreg/R-Drop@9dcc830):
  sentence prediction (roberta_rdrop_src/loss/reg_cross_entropy.py L92-131, `forward_kl`):
    loss = sum_b [CE1_b + CE2_b + alpha/2 * KL_S,b] / B, KL_S = KL(P1||P2) + KL(P2||P1), fp32 softmax;
  seq2seq (translation_rdrop_src/loss/reg_label_smooth_cross_entropy.py L131-168, `forward_reg`):
    loss = [LS-CE1 + LS-CE2 + alpha/2 * sum over target tokens (pads masked) of KL_S] / ntokens of ONE copy.
  The HF BERT/RoBERTa variants weight the KL differently (baselines.md §1.1); divide their alpha accordingly.
Regression (STS-B, `--regression-target`): MSE1 + MSE2 + alpha * (y1 - y2)^2, i.e. alpha/2 * the symmetric KL
of the two unit-variance Gaussians MSE stands for (the authors' BERT code adds 1.0 * MSE(y1, y2); their
fairseq regression branch cannot run: undefined `kl_loss`, B x B broadcast).

Passes: two `model(...)` calls, as the authors' sentence-prediction criterion (their seq2seq one runs a 2B
batch in one call; the distributions are the same). Separate calls give each pass its own Mixout mask,
NEFTune noise and HyPe noise. Eval: one pass, the plain task loss. The logged `loss` is the objective above
(about twice a one-pass CE); `nll_loss` (seq2seq) is the mean of the two passes'; `rdrop_kl` is KL_S without
alpha, per sentence / per target token.

R-Drop needs the passes to differ: a run whose model has no active dropout and no HyPe / Mixout / NEFTune
noise is refused at its first step (KL would be 0 and R-Drop a doubled vanilla step).
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.criterions.sentence_prediction import SentencePredictionConfig
from fairseq.logging import metrics
from fairseq.modules import FairseqDropout
from torch import nn

from baselines_src.neftune import NeftuneConfig, SentencePredictionNeftuneCriterion
from hype_src.perturbation import HypeConfig, hype_forward, validate_hype_config
from robustft_common.kl import gaussian_symmetric_kl, symmetric_kl
from robustft_common.mixout import MixoutConfig, mixout_state
from robustft_common.refusals import RefusedR3FFlags, check_refused
from robustft_common.utils import log_ratio_pairs, logged_sum, unwrap_model
from robustft_common.validation import require, require_finite_nonnegative

ALPHA_HELP = (
    "R-Drop weight alpha: loss = task loss of both passes + alpha/2 * the symmetric KL of their outputs "
    "(the authors' GLUE default 1.0; their translation script 5, summarisation 0.7)"
)


def require_passes_differ(model, *noise_sources: bool) -> None:
    """R-Drop's two passes differ only through randomness: active dropout or another noise source."""
    dropout = any(isinstance(m, (FairseqDropout, nn.Dropout)) and m.p > 0 for m in unwrap_model(model).modules())
    require(
        dropout or any(noise_sources) or mixout_state(model) is not None,
        "--rdrop-alpha",
        "R-Drop compares two passes that differ by their dropout, but the model has no active dropout "
        "(--dropout / --attention-dropout / --activation-dropout / --pooler-dropout are all 0) and no "
        "--hype-type / --mixout-p / --neftune-alpha noise: the KL term would be 0. Turn dropout on (the "
        "authors' recipes: --dropout 0.1 --attention-dropout 0.1)",
    )


@dataclass
class SentencePredictionRDropConfig(SentencePredictionConfig, HypeConfig, MixoutConfig, NeftuneConfig, RefusedR3FFlags):
    rdrop_alpha: float = field(default=1.0, metadata={"help": ALPHA_HELP})


@register_criterion("sentence_prediction_rdrop", dataclass=SentencePredictionRDropConfig)
class SentencePredictionRDropCriterion(SentencePredictionNeftuneCriterion):
    """Sentence classification / regression with R-Drop (NEFTune off unless --neftune-alpha; HyPe, Mixout
    compose: every pass draws its own noise and mask)."""

    SENTENCE_MEAN_KEYS = ("rdrop_kl",)

    def __init__(self, cfg: SentencePredictionRDropConfig, task):
        super().__init__(cfg, task)
        check_refused(cfg, "rdrop", RefusedR3FFlags)
        require_finite_nonnegative("--rdrop-alpha", cfg.rdrop_alpha)
        self.rdrop_alpha = float(cfg.rdrop_alpha)
        self._passes_checked = False

    def extra_terms(self, model, sample, logits, targets):
        if not model.training:
            return None, {}
        if not self._passes_checked:
            require_passes_differ(model, self.hype_settings.enabled, self.neftune.enabled)
            self._passes_checked = True
        logits2 = self.classification_logits(model, sample)
        if self.regression_target:
            kl = gaussian_symmetric_kl(logits, logits2)
        else:
            kl = symmetric_kl(logits, logits2)
        kl_sum = kl.sum()
        extra = self.task_loss(logits2, targets) + 0.5 * self.rdrop_alpha * kl_sum
        return extra, {"rdrop_kl": kl_sum.detach()}


@dataclass
class LabelSmoothedCrossEntropyRDropConfig(LabelSmoothedCrossEntropyCriterionConfig, HypeConfig):
    rdrop_alpha: float = field(default=1.0, metadata={"help": ALPHA_HELP})


@register_criterion("label_smoothed_cross_entropy_rdrop", dataclass=LabelSmoothedCrossEntropyRDropConfig)
class LabelSmoothedCrossEntropyRDropCriterion(LabelSmoothedCrossEntropyCriterion):
    """Encoder-decoder models: label-smoothed CE of both passes + alpha/2 * token-level symmetric KL of the
    decoder's vocabulary distributions (target pads masked), normalised like the CE of one copy."""

    def __init__(self, cfg: LabelSmoothedCrossEntropyRDropConfig, task):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        self.hype_settings = validate_hype_config(cfg)
        require_finite_nonnegative("--rdrop-alpha", cfg.rdrop_alpha)
        self.rdrop_alpha = float(cfg.rdrop_alpha)
        self._passes_checked = False
        self._rdrop_kl = None  # this call's KL term (logged by forward)

    def forward(self, model, sample, reduce=True):
        """fairseq's own forward (its logging, `--report-accuracy`); the second pass runs in `compute_loss`."""
        self._rdrop_kl = None
        with hype_forward(model, self.hype_settings) as hype:
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
        logging_output.update(hype.logging_output)
        if self._rdrop_kl is not None:
            logging_output["rdrop_kl"] = self._rdrop_kl
        return loss, sample_size, logging_output

    def compute_loss(self, model, net_output, sample, reduce=True):
        """Training: + the second pass's LS-CE + alpha/2 * KL; `nll_loss` is the mean of the two passes'.
        fairseq's forward calls this once per batch, with the first pass's output (label_smoothed_cross_entropy.py
        `forward`)."""
        loss, nll_loss = super().compute_loss(model, net_output, sample, reduce=reduce)
        if not model.training:
            return loss, nll_loss
        if not self._passes_checked:
            require_passes_differ(model, self.hype_settings.enabled)
            self._passes_checked = True
        output2 = model(**sample["net_input"])
        loss2, nll_loss2 = super().compute_loss(model, output2, sample, reduce=reduce)
        kl_sum = self._token_kl(model, sample, net_output, output2)
        self._rdrop_kl = kl_sum.detach()
        return loss + loss2 + 0.5 * self.rdrop_alpha * kl_sum, (nll_loss + nll_loss2) / 2

    def _token_kl(self, model, sample, output1, output2):
        """Symmetric KL summed over the target tokens (pads and `--ignore-prefix-size` tokens excluded)."""
        target = model.get_targets(sample, output1)
        logits1, logits2 = output1[0], output2[0]
        if self.ignore_prefix_size > 0:
            p = self.ignore_prefix_size
            logits1, logits2, target = logits1[:, p:], logits2[:, p:], target[:, p:]
        return symmetric_kl(logits1, logits2, mask=target.ne(self.padding_idx)).sum()

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        ntokens = logged_sum(logging_outputs, "ntokens")
        if any("rdrop_kl" in log for log in logging_outputs) and ntokens > 0:
            # per target token, without alpha
            metrics.log_scalar("rdrop_kl", logged_sum(logging_outputs, "rdrop_kl") / ntokens, ntokens, round=6)
        log_ratio_pairs(logging_outputs)
