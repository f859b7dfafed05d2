"""NEFTune (Jain et al., 2023): uniform noise on the token embeddings while training,
E + U(-1, 1) * alpha / sqrt(L * d) (d the embedding dim, L the sequence length); eval is untouched.

The noise goes through R3F's embedding-noise mechanism (`rxf_src/embedding_noise.py`, one noise tensor per
forward, added in fp32 where the encoder consumes the embeddings, before `embed_scale`, positions and
`layernorm_embedding`, as a hook on `embed_tokens` would), so NEFTune reaches RoBERTa / BART / transformer
encoders and is counted like R3F's (`neftune_noise_effective`). NEFTune is R3F's noisy pass without the
clean pass and the KL term.

L: the three reference implementations disagree. `--neftune-length padded` (default) = the batch's padded
length, as the authors' README snippet (neelsjain/NEFTune@09d4909 README L25-34, `embed_init.size(1)`) and
the maintained HF Trainer hook (transformers v4.35.0 trainer_utils.py L108-131, `output.size(1)`);
`nonpad` = each sentence's own non-pad length, as the authors' experiment code (experiment_code/train.py
L143-159, `attention_mask` sums; pads get no noise). fairseq's encoder zeroes pad rows after the embedding
(fairseq/models/transformer/transformer_encoder.py:212-217), so noise on pads never reaches a layer either way.
alpha: 5 in the README snippet and the experiment script (experiment_code/README.md L41-48).

`--neftune-alpha` is a flag of `sentence_prediction_neftune` (default 5) and of `sentence_prediction_rdrop`
(default 0 = off: each R-Drop pass then gets its own NEFTune noise). Not on the R3F criterions: both noise
the same embeddings (there is no such flag there, so fairseq refuses it at startup).
"""

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from hype_src.perturbation import HypeConfig, hype_forward, validate_hype_config
from robustft_common.mixout import MixoutConfig
from robustft_common.sentence_prediction import RobustSentencePredictionCriterion
from robustft_common.validation import require, require_choice, require_finite_nonnegative
from rxf_src.embedding_noise import noised_forward, transformer_encoder

NEFTUNE_LENGTHS = ("padded", "nonpad")


@dataclass
class NeftuneConfig(FairseqDataclass):
    neftune_alpha: float = field(
        default=0.0,
        metadata={
            "help": "NEFTune: add U(-1, 1) * alpha / sqrt(L * d) to the token embeddings while training "
            "(the authors' default 5); 0 = off"
        },
    )
    neftune_length: ChoiceEnum(list(NEFTUNE_LENGTHS)) = field(  # type: ignore[valid-type]
        default="padded",
        metadata={
            "help": "L of NEFTune's scale: padded = the batch's padded length (authors' README, HF Trainer), "
            "nonpad = each sentence's non-pad length (authors' experiment code)"
        },
    )


class NeftuneSettings(NamedTuple):
    alpha: float
    nonpad: bool

    @property
    def enabled(self) -> bool:
        return self.alpha > 0


def neftune_settings(cfg) -> NeftuneSettings:
    """Validate the `--neftune-*` flags of a config (missing = default)."""
    alpha = getattr(cfg, "neftune_alpha", 0.0)
    length = str(getattr(cfg, "neftune_length", "padded"))
    require_finite_nonnegative("--neftune-alpha", alpha)
    require_choice("--neftune-length", length, NEFTUNE_LENGTHS)
    require(alpha > 0 or length == "padded", "--neftune-alpha", f"--neftune-length {length} set but alpha is 0")
    return NeftuneSettings(float(alpha), length == "nonpad")


def neftune_scale(
    src_tokens: torch.Tensor, padding_idx: int, embed_dim: int, settings: NeftuneSettings
) -> float | torch.Tensor:
    """alpha / sqrt(L * d): a number (padded L), or B x 1 x 1 fp32 per-sentence scales (non-pad L)."""
    if not settings.nonpad:
        return settings.alpha / math.sqrt(src_tokens.size(1) * embed_dim)
    lengths = src_tokens.ne(padding_idx).sum(dim=1).clamp(min=1).float()
    return (settings.alpha / (lengths * embed_dim).sqrt()).view(-1, 1, 1)


def neftune_forward(model, src_tokens: torch.Tensor, settings: NeftuneSettings, forward):
    """Run `forward()` with NEFTune noise on the encoder's embeddings of `src_tokens`; returns (output, the
    noise context: `noise` (fp32, scaled), `changed` / `total`)."""
    encoder = transformer_encoder(model, "NEFTune")
    scale = neftune_scale(src_tokens, encoder.padding_idx, encoder.embed_tokens.embedding_dim, settings)
    return noised_forward(model, src_tokens, scale, "uniform", forward, method="NEFTune")


@dataclass
class SentencePredictionNeftuneConfig(SentencePredictionConfig, HypeConfig, MixoutConfig, NeftuneConfig):
    neftune_alpha: float = field(
        default=5.0,
        metadata={"help": "NEFTune: add U(-1, 1) * alpha / sqrt(L * d) to the token embeddings while training"},
    )


@register_criterion("sentence_prediction_neftune", dataclass=SentencePredictionNeftuneConfig)
class SentencePredictionNeftuneCriterion(RobustSentencePredictionCriterion):
    """The stock sentence-prediction loss with NEFTune noise on every training pass (HyPe and Mixout compose)."""

    def __init__(self, cfg, task):
        super().__init__(cfg, task)
        self.hype_settings = validate_hype_config(cfg)
        self.neftune = neftune_settings(cfg)
        self._noise_counts: list = []  # (changed, total) of this call's noised passes

    def forward(self, model, sample, reduce=True):
        self._noise_counts = []
        with hype_forward(model, self.hype_settings) as hype:
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
        logging_output.update(hype.logging_output)
        if self._noise_counts:
            logging_output["neftune_noise_effective_num"] = sum(c for c, _ in self._noise_counts)
            logging_output["neftune_noise_effective_den"] = sum(t for _, t in self._noise_counts)
        return loss, sample_size, logging_output

    def classification_logits(self, model, sample) -> torch.Tensor:
        plain = functools.partial(super().classification_logits, model, sample)
        if not (model.training and self.neftune.enabled):
            return plain()
        logits, noise = neftune_forward(model, sample["net_input"]["src_tokens"], self.neftune, plain)
        self._noise_counts.append((noise.changed, noise.total))
        return logits
