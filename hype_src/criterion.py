"""`--criterion hype_sentence_prediction`: the stock sentence-prediction loss under HyPe noise.

Loss and metrics are those of `RobustSentencePredictionCriterion` (fairseq's `sentence_prediction`,
DDP-safe); the only addition is the HyPe perturbation of every encoder layer's input while training
(`hype_src.perturbation`), plus the logged ratio `hype_noise_effective`. Unlike the `HypeConfig` mixin
(default `none`, for criterions that merely compose with HyPe), this criterion defaults to
`--hype-type normal` (HyPe-N, the paper's best average on GLUE); `--hype-type none` makes it vanilla.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig
from fairseq.dataclass import ChoiceEnum

from hype_src.perturbation import HYPE_TYPES, HypeConfig, hype_forward, validate_hype_config
from robustft_common.mixout import MixoutConfig
from robustft_common.sentence_prediction import RobustSentencePredictionCriterion


@dataclass
class HypeSentencePredictionConfig(SentencePredictionConfig, HypeConfig, MixoutConfig):
    hype_type: ChoiceEnum(list(HYPE_TYPES)) = field(
        default="normal",
        metadata={
            "help": "HyPe noise on every Transformer layer's input while training: "
            "normal N(0, eps^2) (default), uniform (see --hype-uniform), "
            "none (vanilla fine-tuning)"
        },
    )


@register_criterion("hype_sentence_prediction", dataclass=HypeSentencePredictionConfig)
class HypeSentencePredictionCriterion(RobustSentencePredictionCriterion):
    def __init__(self, cfg: HypeSentencePredictionConfig, task):
        super().__init__(cfg, task)
        # bad --hype-* values fail at startup, before any data is read
        self.hype_settings = validate_hype_config(cfg)

    def forward(self, model, sample, reduce=True):
        with hype_forward(model, self.hype_settings) as hype:
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        logging_output.update(hype.logging_output)
        return loss, sample_size, logging_output
