"""SMART (Jiang et al., ACL 2020): smoothness-inducing adversarial regularisation with the Bregman proximal
point (momentum teacher) term, for sentence classification and regression.

loss = task loss + lambda_s * R_s + mu * D_Breg (each summed over sentences, like the task loss), with
- R_s = l_s(f(x), f(x + delta)): delta starts as N(0, sigma^2) on the non-pad token embeddings and takes
  `--smart-steps` ascent steps on l_s(f(x + delta), sg f(x)) (power iteration: delta <- Proj_eps(delta +
  eta * g / ||g||), per-token norm); then one more pass at x + delta, whose loss trains the model. l_s is the
  symmetric KL of the class distributions as mt-dnn computes it (`SymKlCriterion`, mt_dnn/loss.py L133-155:
  KL(sg Q || P) + KL(sg P || Q): each direction trains only its own logits), MSE for regression;
- D_Breg = l_s(f(x; theta), f(x; theta~)) with the teacher theta~ <- beta theta~ + (1 - beta) theta after every
  update, beta = `--smart-beta` for the first `--smart-beta-switch` of --max-update, then `--smart-beta-late`
  (paper Alg. 1; mt-dnn's release has no teacher, baselines.md §3.2). The teacher starts as the weights the run
  starts from, is an fp32 copy kept in the checkpoint (fairseq_patches.criterion_update_hooks: updated after
  each optimizer step, saved in extra_state, restored on resume unless --reset-optimizer) and predicts in eval
  mode (no dropout, no HyPe noise) under no_grad.
All passes run in train mode with their own dropout, as mt-dnn's. Eval runs the clean pass only.

Where delta goes: the token embeddings, through R3F's hook (`rxf_src.embedding_noise.EncoderEmbeddingNoise`,
before positions and `layernorm_embedding`), as the R3F paper frames SMART and as mt-dnn's current code feeds it
(`embed + delta` as `inputs_embeds`, commit 1f43b6e); mt-dnn before 2021 added it after the embedding layer norm
(baselines.md §3.2). The inner ascent runs on the unwrapped model with `torch.autograd.grad` (no parameter
gradients, no DDP hooks); its loss is scaled by 2^16 (exact in floating point) so fp16 gradients do not
underflow, and the step is normalised anyway. A non-finite ascent gradient skips the adversarial term for
that batch (mt-dnn's `return 0` crashes its caller) and is logged as `smart_skipped`.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig
from fairseq.dataclass import ChoiceEnum
from omegaconf import II

from hype_src.perturbation import HypeConfig, hype_forward, validate_hype_config
from robustft_common.mixout import MixoutConfig
from robustft_common.refusals import RefusedR3FFlags, check_refused
from robustft_common.sentence_prediction import RobustSentencePredictionCriterion
from robustft_common.utils import unwrap_model
from robustft_common.validation import require, require_choice, require_finite_nonnegative, require_positive
from rxf_src.embedding_noise import EncoderEmbeddingNoise, transformer_encoder

SMART_NORMS = ("linf", "l2")
INNER_LOSS_SCALE = 2.0**16  # a power of two: scaling is exact, the normalised step is unchanged
_TINY = 1e-30  # division guard of the normalised step (a token whose gradient is 0 gets no step)


@dataclass
class SentencePredictionSmartConfig(SentencePredictionConfig, HypeConfig, MixoutConfig, RefusedR3FFlags):
    smart_lambda: float = field(default=1.0, metadata={"help": "lambda_s: weight of R_s (paper grid {1, 3, 5})"})
    smart_steps: int = field(default=1, metadata={"help": "ascent steps T on delta (paper and mt-dnn: 1)"})
    smart_step_size: float = field(default=1e-3, metadata={"help": "eta: ascent step size (paper 1e-3)"})
    smart_noise_std: float = field(default=1e-5, metadata={"help": "sigma: std of delta's random start"})
    smart_eps: float = field(
        default=1e-5, metadata={"help": "epsilon: radius of the per-token ball delta is projected on"}
    )
    smart_norm: ChoiceEnum(list(SMART_NORMS)) = field(  # type: ignore[valid-type]
        default="linf", metadata={"help": "per-token norm of the step normalisation and the ball (paper: inf)"}
    )
    smart_mu: float = field(default=1.0, metadata={"help": "mu: weight of the Bregman term; 0 = no teacher"})
    smart_beta: float = field(default=0.99, metadata={"help": "teacher momentum for the first updates"})
    smart_beta_late: float = field(default=0.999, metadata={"help": "teacher momentum afterwards"})
    smart_beta_switch: float = field(
        default=0.1, metadata={"help": "share of --max-update run with --smart-beta (paper: the first 10%)"}
    )
    max_update: int = II("optimization.max_update")


def mtdnn_symmetric_kl(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per sentence, fp32: KL(sg Q || P) + KL(sg P || Q) with P = softmax(clean), Q = softmax(adv); the value
    of the symmetric KL, the gradient of mt-dnn's SymKlCriterion (each half trains one side)."""
    log_p = F.log_softmax(clean, dim=-1, dtype=torch.float32)
    log_q = F.log_softmax(adv, dim=-1, dtype=torch.float32)
    sg_p, sg_q = log_p.detach(), log_q.detach()
    return (sg_q.exp() * (sg_q - log_p)).sum(-1) + (sg_p.exp() * (sg_p - log_q)).sum(-1)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float, norm: str) -> torch.Tensor:
    """Proj_eps(delta + eta * g / ||g||) with per-token norms (last dim): paper Alg. 1 (inf) or l2."""
    if norm == "linf":
        direction = grad / grad.abs().amax(-1, keepdim=True).clamp_min(_TINY)
        return (delta + step_size * direction).clamp(-eps, eps)
    direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    delta = delta + step_size * direction
    return delta * (eps / delta.norm(dim=-1, keepdim=True).clamp_min(_TINY)).clamp(max=1.0)


@register_criterion("sentence_prediction_smart", dataclass=SentencePredictionSmartConfig)
class SentencePredictionSmartCriterion(RobustSentencePredictionCriterion):
    SENTENCE_MEAN_KEYS = ("smart_adv", "smart_bregman")

    def __init__(self, cfg: SentencePredictionSmartConfig, task):
        super().__init__(cfg, task)
        check_refused(cfg, "smart", RefusedR3FFlags)
        self.hype_settings = validate_hype_config(cfg)
        self.lam, self.mu = float(cfg.smart_lambda), float(cfg.smart_mu)
        self.steps, self.eta = int(cfg.smart_steps), float(cfg.smart_step_size)
        self.sigma, self.eps, self.norm = float(cfg.smart_noise_std), float(cfg.smart_eps), str(cfg.smart_norm)
        self.betas = (float(cfg.smart_beta), float(cfg.smart_beta_late))
        self.switch_update = self._validate(cfg)
        self.teacher: dict[str, torch.Tensor] | None = None  # fp32, same names as the model's parameters

    def _validate(self, cfg) -> int:
        for flag, value in (("--smart-lambda", self.lam), ("--smart-mu", self.mu), ("--smart-noise-std", self.sigma)):
            require_finite_nonnegative(flag, value)
        require_positive("--smart-step-size", self.eta)
        require_positive("--smart-eps", self.eps)
        require_choice("--smart-norm", self.norm, SMART_NORMS)
        require(self.steps >= 1, "--smart-steps", f"must be an integer >= 1, got {self.steps!r}")
        for flag, beta in (("--smart-beta", self.betas[0]), ("--smart-beta-late", self.betas[1])):
            require(0.0 <= beta < 1.0, flag, f"must be in [0, 1), got {beta!r}")
        share = float(cfg.smart_beta_switch)
        require(0.0 <= share <= 1.0, "--smart-beta-switch", f"must be in [0, 1], got {share!r}")
        max_update = int(getattr(cfg, "max_update", 0) or 0)
        require(
            self.mu == 0 or share == 0 or max_update > 0,
            "--smart-beta-switch",
            f"{share} is a share of --max-update, which is not set; pass --max-update, or --smart-beta-switch 0 "
            "(--smart-beta-late from the start), or --smart-mu 0 (no teacher)",
        )
        return math.ceil(share * max_update)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, model, sample, reduce=True):
        with hype_forward(model, self.hype_settings) as hype:  # HyPe noise in every training pass
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
        logging_output.update(hype.logging_output)
        return loss, sample_size, logging_output

    def extra_terms(self, model, sample, logits, targets):
        if not model.training:
            return None, {}
        adv, logging_output = self.adversarial_term(model, sample, logits)
        extra = self.lam * adv
        if self.mu > 0:
            bregman = self.divergence(logits, self.teacher_logits(model, sample)).sum()
            logging_output["smart_bregman"] = bregman.detach()
            extra = extra + self.mu * bregman
        return extra, logging_output

    def divergence(self, clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """l_s per sentence: symmetric KL (mt-dnn's gradients) or squared error for regression."""
        if self.regression_target:
            return (clean.view(-1).float() - other.view(-1).float()).pow(2)
        return mtdnn_symmetric_kl(clean, other)

    # ------------------------------------------------------------------------------------ R_s
    def perturbed_logits(self, model, sample, delta: torch.Tensor) -> torch.Tensor:
        src_tokens = sample["net_input"]["src_tokens"]
        with EncoderEmbeddingNoise(model, src_tokens, method="SMART", delta=delta) as hook:
            logits = self.classification_logits(model, sample)
        require(hook.fired, "--criterion", "SMART: the forward never embedded the source tokens")
        return logits

    def adversarial_term(self, model, sample, logits):
        """(R_s summed over sentences, logging entries)."""
        src_tokens = sample["net_input"]["src_tokens"]
        encoder = transformer_encoder(model, "SMART")
        keep = src_tokens.ne(encoder.padding_idx).unsqueeze(-1).float()
        shape = (*src_tokens.shape, encoder.embed_tokens.embedding_dim)
        delta = torch.randn(shape, device=src_tokens.device) * self.sigma * keep
        inner_model = unwrap_model(model)  # no DDP hooks: the ascent computes no parameter gradient
        target = logits.detach()
        for _ in range(self.steps):
            delta.requires_grad_()
            inner = self.divergence(target, self.perturbed_logits(inner_model, sample, delta)).sum()
            (grad,) = torch.autograd.grad(inner * INNER_LOSS_SCALE, delta)
            if not bool(torch.isfinite(grad).all()):
                zero = logits.new_zeros((), dtype=torch.float32)
                return zero, {"smart_skipped_num": 1, "smart_skipped_den": 1}
            delta = ascent_step(delta.detach(), grad, self.eta, self.eps, self.norm) * keep
        adv = self.divergence(logits, self.perturbed_logits(model, sample, delta)).sum()
        return adv, {"smart_adv": adv.detach(), "smart_skipped_num": 0, "smart_skipped_den": 1}

    # ------------------------------------------------------------------------------------ Bregman teacher
    def teacher_logits(self, model, sample) -> torch.Tensor:
        inner = unwrap_model(model)
        named = dict(inner.named_parameters())
        if self.teacher is None:  # the weights the run starts from
            self.teacher = {n: p.detach().float().clone() for n, p in named.items()}
        self._check_teacher(named)
        weights = {n: self.teacher[n].to(dtype=p.dtype) for n, p in named.items()}
        inner.eval()
        try:
            with torch.no_grad():
                return self.classification_logits(
                    lambda **kwargs: torch.func.functional_call(inner, weights, (), kwargs), sample
                )
        finally:
            inner.train()

    def _check_teacher(self, named) -> None:
        teacher = self.teacher
        assert teacher is not None
        if teacher.keys() != named.keys() or any(teacher[n].shape != p.shape for n, p in named.items()):
            raise ValueError(
                "--smart-mu: the checkpoint's SMART teacher does not match this model's parameters; "
                "pass --reset-optimizer to start a new teacher"
            )
        for n, p in named.items():
            if teacher[n].device != p.device:  # restored from a checkpoint on the CPU
                teacher[n] = teacher[n].to(p.device)

    def robustft_after_update(self, model, num_updates: int) -> None:
        """theta~ <- beta theta~ + (1 - beta) theta, after each optimizer step (fairseq_patches)."""
        if self.teacher is None or self.mu == 0:
            return
        beta = self.betas[0] if num_updates <= self.switch_update else self.betas[1]
        with torch.no_grad():
            for name, p in unwrap_model(model).named_parameters():
                self.teacher[name].mul_(beta).add_(p.detach().float(), alpha=1.0 - beta)

    def robustft_state_dict(self) -> dict:
        return {"teacher": self.teacher}

    def robustft_load_state_dict(self, state: dict) -> None:
        self.teacher = state.get("teacher")
