"""R3F / R4F for sentence classification and regression (RoBERTa, XLM-R, BART heads).

loss = task loss + r3f_lambda * sum over sentences of KL_S(clean pass || noised pass), both passes in
train mode (independent dropout), gradients through both; eval runs the clean pass only.
"""

import logging
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig
from fairseq.dataclass import ChoiceEnum

from hype_src.perturbation import HypeConfig, hype_forward
from robustft_common.kl import gaussian_symmetric_kl, symmetric_kl
from robustft_common.mixout import MixoutConfig
from robustft_common.refusals import RefusedNeftuneFlags, check_refused
from robustft_common.sentence_prediction import RobustSentencePredictionCriterion
from robustft_common.spectral_norm_heads import (
    HEAD_MATRICES,
    check_dense_normalised,
    check_init_only,
    head_weights,
    rescale_to_unit_sigma,
    scale_steps,
    trained_sigmas,
)
from robustft_common.utils import unwrap_model
from robustft_common.validation import require, require_choice
from rxf_src.embedding_noise import R3F_NOISE_TYPES, noised_forward, validate_r3f_flags

REGRESSION_KL = ("gaussian", "none")
logger = logging.getLogger(__name__)


@dataclass
class SentencePredictionR3FConfig(SentencePredictionConfig, HypeConfig, MixoutConfig, RefusedNeftuneFlags):
    # `--eps`, `--r3f-lambda`, `--noise-type`: the reference's flag names, kept for drop-in recipes
    # (no fairseq component defines `eps` / `noise_type`; a test checks the values arrive).
    eps: float = field(
        default=1e-5,
        metadata={
            "help": "R3F noise scale on the encoder's token embeddings: half-range of uniform U(-eps, eps), "
            "std of normal N(0, eps^2); 0 keeps only the dropout difference between the passes"
        },
    )
    r3f_lambda: float = field(
        default=1.0, metadata={"help": "weight of the symmetric KL term (per sentence, like the task loss)"}
    )
    noise_type: ChoiceEnum(list(R3F_NOISE_TYPES)) = field(
        default="uniform", metadata={"help": "R3F noise distribution"}
    )
    r3f_regression_kl: ChoiceEnum(list(REGRESSION_KL)) = field(
        default="gaussian",
        metadata={
            "help": "with --regression-target: gaussian = symmetric KL of the two unit-variance-MSE Gaussians, "
            "2 * (clean - noisy)^2 per sentence; none = no R3F term and no noisy pass (the reference "
            "runs the noisy pass and ignores it)"
        },
    )
    r4f_spectral_norm_dense: bool = field(
        default=False,
        metadata={
            "help": "R4F as in the paper: with --spectral-norm-classification-head also spectral-normalise the "
            "head's dense layer (fairseq normalises out_proj only); applied when the model registers the "
            "head, under fairseq-train and hydra alike (robustft_common/spectral_norm_heads.py)"
        },
    )
    r4f_spectral_norm_init_only: bool = field(
        default=False,
        metadata={
            "help": "an ablation of R4F, not R4F: with --spectral-norm-classification-head "
            "--r4f-spectral-norm-dense, divide the head's dense and out_proj by their largest singular values "
            "once, when training starts (after --restore-file is loaded), and train them plain (R4F's "
            "starting scale without its constraint during training)"
        },
    )
    r4f_init_only_scaled_steps: bool = field(
        default=False,
        metadata={
            "help": "with --r4f-spectral-norm-init-only, also multiply each head matrix's optimizer step by "
            "1/sigma (the value it was divided by when training started): the step R4F's normalisation gives the "
            "head while its sigma stays at the start (under Adam, that matrix's lr x 1/sigma); fp32 only"
        },
    )


@register_criterion("sentence_prediction_r3f", dataclass=SentencePredictionR3FConfig)
class SentencePredictionR3FCriterion(RobustSentencePredictionCriterion):
    SENTENCE_MEAN_KEYS = ("symm_kl",)

    def __init__(self, cfg: SentencePredictionR3FConfig, task):
        super().__init__(cfg, task)
        check_refused(cfg, "r3f", RefusedNeftuneFlags)
        validate_r3f_flags(cfg)
        require_choice("--r3f-regression-kl", cfg.r3f_regression_kl, REGRESSION_KL)
        self.cfg = cfg
        self.eps = float(cfg.eps)
        self.r3f_lambda = float(cfg.r3f_lambda)
        self.noise_type = str(cfg.noise_type)
        self.noisy_pass_on_regression = str(cfg.r3f_regression_kl) == "gaussian"
        self._init_only = bool(cfg.r4f_spectral_norm_init_only)
        self._check_head = bool(cfg.r4f_spectral_norm_dense) or self._init_only
        self._training_started = False  # the init-only head is rescaled when the trainer has loaded
        self._scaled_steps = bool(cfg.r4f_init_only_scaled_steps)
        require(
            not self._scaled_steps or self._init_only,
            "--r4f-init-only-scaled-steps",
            "scales the steps of the init-only ablation's head; also pass --r4f-spectral-norm-init-only",
        )
        self._step_scales: dict | None = None  # {matrix: 1 / sigma at the start}, checkpointed (robustft_state_dict)
        self._step_start: dict | None = None  # the head's weights before this update's optimizer step
        self._explain_regression_kl(cfg)

    def _explain_regression_kl(self, cfg) -> None:
        """`--r3f-regression-kl none` is never silent: on regression it turns R3F off, elsewhere it does nothing."""
        if str(cfg.r3f_regression_kl) != "none":
            return
        require(
            self.regression_target,
            "--r3f-regression-kl",
            "none applies only with --regression-target (it drops the R3F term of regression tasks); a "
            "classification run always has the R3F term: remove the flag",
        )
        logger.warning(
            "R3F is OFF: --r3f-regression-kl none with --regression-target trains on the plain MSE (no noisy pass, "
            "no KL term, --eps/--r3f-lambda unused), the reference's effective behaviour; use "
            "--r3f-regression-kl gaussian for R3F on regression"
        )

    def forward(self, model, sample, reduce=True):
        if self._check_head:  # once: never train "R4F" (or its ablation) with the wrong head, silently
            check = check_init_only if self._init_only else check_dense_normalised
            check(unwrap_model(model), self.classification_head_name)
            if model.training:  # evaluating a trained head needs no rescale
                require(
                    not self._init_only or self._training_started,
                    "--r4f-spectral-norm-init-only",
                    "the head is divided by its sigma when fairseq's Trainer has loaded its checkpoint "
                    "(fairseq-train, scripts/hydra_train.py); this training loop never called "
                    "Trainer.load_checkpoint",
                )
                self._check_head = False
        if model.training and self._scaled_steps and self._step_start is None:  # first forward of this update
            self._step_start = head_weights(unwrap_model(model), self.classification_head_name)
        with hype_forward(model, self.cfg) as hype:  # counts HyPe's noise in both passes
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
        logging_output.update(hype.logging_output)
        if model.training:
            logging_output.update(self._head_sigma_logs(unwrap_model(model)))
        return loss, sample_size, logging_output

    def _head_sigma_logs(self, model) -> dict:
        """R4F logs `head_sigma_<matrix>` for each normalised head matrix, its init-only ablation for both plain
        ones, plain R3F nothing (the mean over the log interval of `spectral_norm_heads.trained_sigmas`): how far
        the normalisation rescales R4F's head, and how far the ablation's head drifts from sigma 1."""
        sigmas = trained_sigmas(model, self.classification_head_name, plain=self._init_only)
        logs = {f"head_sigma_{name}_num": sigma for name, sigma in sigmas.items()}
        return {**logs, **{f"head_sigma_{name}_den": 1 for name in sigmas}}

    def robustft_after_checkpoint_load(self, model, num_updates: int) -> None:
        """`--r4f-spectral-norm-init-only`: at update 0 (after --restore-file is loaded, before the optimizer
        exists) divide the head's matrices by their largest singular values; a resumed run keeps its head (and,
        with --r4f-init-only-scaled-steps, the step scales its checkpoint saved)."""
        if not self._init_only:
            return
        self._step_start = None
        if num_updates == 0:
            sigmas = rescale_to_unit_sigma(unwrap_model(model), self.classification_head_name)
            logger.info(
                "--r4f-spectral-norm-init-only: head %r divided by its largest singular values (%s) before training%s",
                self.classification_head_name,
                ", ".join(f"{name} {sigma:.4g}" for name, sigma in sigmas.items()),
                "; its steps are multiplied by 1/sigma (--r4f-init-only-scaled-steps)" if self._scaled_steps else "",
            )
            if self._scaled_steps:
                self._step_scales = {name: 1.0 / sigma for name, sigma in sigmas.items()}
        if self._scaled_steps:
            self._check_scaled_steps(unwrap_model(model), num_updates)
        self._training_started = True

    def _check_scaled_steps(self, model, num_updates: int) -> None:
        require(
            self._step_scales is not None,
            "--r4f-init-only-scaled-steps",
            f"resuming at update {num_updates} needs the step scales the run's checkpoint saves (extra_state "
            "'robustft_criterion'); this checkpoint was saved without the flag: restart from update 0",
        )
        head = model.classification_heads[self.classification_head_name]
        require(
            all(getattr(head, name).weight.dtype == torch.float32 for name in HEAD_MATRICES),
            "--r4f-init-only-scaled-steps",
            "scales the step on the model's weights, which must be fp32: under --fp16 / --bf16 fairseq steps "
            "fp32 copies of them and would overwrite the scaled step; run in fp32",
        )

    def robustft_after_update(self, model, num_updates: int) -> None:
        """`--r4f-init-only-scaled-steps`: the optimizer has stepped (fairseq's Trainer.set_num_updates); scale
        the head's step."""
        if self._step_start is None:
            return
        assert self._step_scales is not None, "known since training started (robustft_after_checkpoint_load)"
        scale_steps(model, self.classification_head_name, self._step_start, self._step_scales)
        self._step_start = None

    def robustft_state_dict(self) -> dict:
        return {"r4f_head_step_scales": self._step_scales} if self._step_scales else {}

    def robustft_load_state_dict(self, state: dict) -> None:
        if self._scaled_steps and "r4f_head_step_scales" in state:
            self._step_scales = dict(state["r4f_head_step_scales"])

    def extra_terms(self, model, sample, logits, targets):
        logging_output = {}
        if not model.training or (self.regression_target and not self.noisy_pass_on_regression):
            return None, logging_output
        noisy_logits, noise = noised_forward(
            model,
            sample["net_input"]["src_tokens"],
            self.eps,
            self.noise_type,
            lambda: self.classification_logits(model, sample),
        )
        if self.regression_target:
            kl = gaussian_symmetric_kl(logits, noisy_logits)
        else:
            kl = symmetric_kl(logits, noisy_logits)
        kl_sum = kl.sum()
        logging_output.update(
            symm_kl=kl_sum.detach(), r3f_noise_effective_num=noise.changed, r3f_noise_effective_den=noise.total
        )
        return self.r3f_lambda * kl_sum, logging_output
