"""R3F for encoder-decoder models (BART, transformer): label-smoothed CE + lambda * token-level symmetric KL
between the decoder's vocabulary distributions of a clean and an encoder-embedding-noised pass."""

from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics

from hype_src.perturbation import HypeConfig, hype_forward
from robustft_common.kl import symmetric_kl
from robustft_common.utils import log_ratio_pairs
from robustft_common.validation import require_choice
from rxf_src.embedding_noise import R3F_NOISE_TYPES, noised_forward, validate_r3f_flags

KL_NORMS = ("token", "sentence")


@dataclass
class LabelSmoothedCrossEntropyR3FConfig(LabelSmoothedCrossEntropyCriterionConfig, HypeConfig):
    eps: float = field(
        default=1e-5,
        metadata={
            "help": "R3F noise scale on the encoder's token embeddings (decoder inputs stay clean): half-range "
            "of uniform U(-eps, eps), std of normal N(0, eps^2)"
        },
    )
    r3f_lambda: float = field(default=1.0, metadata={"help": "weight of the symmetric KL term"})
    noise_type: ChoiceEnum(list(R3F_NOISE_TYPES)) = field(default="normal", metadata={"help": "R3F noise distribution"})
    r3f_kl_norm: ChoiceEnum(list(KL_NORMS)) = field(
        default="token",
        metadata={
            "help": "token: KL summed over target tokens (pads excluded) and normalised like the CE "
            "(per token, or per sentence with --sentence-avg); sentence: the reference's scale, "
            "KL summed over target tokens / #sentences * sample_size (lambda x mean target length)"
        },
    )


@register_criterion("label_smoothed_cross_entropy_r3f", dataclass=LabelSmoothedCrossEntropyR3FConfig)
class LabelSmoothedCrossEntropyR3FCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, cfg: LabelSmoothedCrossEntropyR3FConfig, task):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        validate_r3f_flags(cfg)
        require_choice("--r3f-kl-norm", cfg.r3f_kl_norm, KL_NORMS)
        self.cfg = cfg
        self.noise_eps = float(cfg.eps)  # self.eps is the parent's label smoothing
        self.r3f_lambda = float(cfg.r3f_lambda)
        self.noise_type = str(cfg.noise_type)
        self.kl_norm = str(cfg.r3f_kl_norm)

    def forward(self, model, sample, reduce=True):
        with hype_forward(model, self.cfg) as hype:  # counts HyPe's noise in both passes
            loss, sample_size, logging_output = self._forward(model, sample, reduce)
        logging_output.update(hype.logging_output)
        return loss, sample_size, logging_output

    def _forward(self, model, sample, reduce):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        nsentences = sample["target"].size(0)
        sample_size = nsentences if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": sample_size,
        }

        if model.training:
            noisy_output, noise = noised_forward(
                model,
                sample["net_input"]["src_tokens"],
                self.noise_eps,
                self.noise_type,
                lambda: model(**sample["net_input"]),
            )
            target = model.get_targets(sample, net_output)
            logits, noisy_logits = net_output[0], noisy_output[0]
            if self.ignore_prefix_size > 0:
                p = self.ignore_prefix_size
                logits, noisy_logits, target = logits[:, p:], noisy_logits[:, p:], target[:, p:]
            kl_sum = symmetric_kl(logits, noisy_logits, mask=target.ne(self.padding_idx)).sum()
            if self.kl_norm == "sentence":
                kl_term = kl_sum / nsentences * sample_size
            else:
                kl_term = kl_sum
            loss = loss + self.r3f_lambda * kl_term
            logging_output.update(
                symm_kl=kl_sum.detach(), r3f_noise_effective_num=noise.changed, r3f_noise_effective_den=noise.total
            )
        logging_output["loss"] = loss.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        _sum = lambda key: utils.item(sum(log.get(key, 0) for log in logging_outputs))  # noqa: E731
        ntokens = _sum("ntokens")
        if any("symm_kl" in log for log in logging_outputs) and ntokens > 0:
            # per target token, without lambda
            metrics.log_scalar("symm_kl", _sum("symm_kl") / ntokens, ntokens, round=6)
        log_ratio_pairs(logging_outputs)
