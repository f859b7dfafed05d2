"""FreeLB (Zhu et al., ICLR 2020) for sentence classification and regression: `--task sentence_prediction_freelb`.

Per update, K = `--freelb-steps` ascent steps on a perturbation delta of the token embeddings, with the
parameter gradients of every pass accumulated ("free" adversarial training), as the authors' fairseq code does
(zhuchen03/FreeLB fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py `freelb_train_step`, baselines.md §4):
  delta_0 = U(-1, 1) * mask * init_mag / sqrt(L_i * d)  (l2; linf: U(-init_mag, init_mag) * mask; 0 if init_mag 0)
  for t = 0..K:  backward( L(f(x + delta_t), y) / (K + 1) )  (K + 1 passes, one graph alive at a time)
                 if t < K: delta_{t+1} = Proj(delta_t + adv_lr * g / ||g||), g = grad of that pass w.r.t. delta,
                 norms per sentence over all its tokens (l2: ||g||_2 >= 1e-10, rescaled onto ||delta||_2 <=
                 max_norm; linf: ||g||_inf >= 1e-8, clamped to +-max_norm; max_norm 0: unbounded)
then one optimizer step with the accumulated gradient. L_i = the sentence's non-pad tokens, d = embedding dim.
The HF version (run_glue_freelb.py) runs K passes with K - 1 ascent steps: its `--adv-steps K` is
`--freelb-steps K-1` here.

Any sentence-prediction criterion computes L (so FreeLB composes with HyPe through
`hype_sentence_prediction`), each pass is the stock `FairseqTask.train_step` (autocast, `optimizer.backward`
with the fp16 loss scale) on the criterion's loss / (K + 1). delta enters through R3F's embedding hook
(`rxf_src.embedding_noise.EncoderEmbeddingNoise`: before positions and `layernorm_embedding`, like the fork's
`token_embed=delta + embed_tokens(src_tokens)`). The passes share their dropout masks (the fork's default;
`--freelb-no-sync-dropout` turns it off): the RNG state after drawing delta_0 is restored before every pass,
which also repeats HyPe's noise. Passes before the last run under DDP's `no_sync`, so gradients are all-reduced
once per update. The logged `loss` is the mean over the passes; `freelb_delta_norm` is the mean l2 norm of the
last pass's delta per sentence. Criterions that perturb the embeddings themselves are refused (R3F, SMART,
NEFTune: noise on the adversarial delta at the same point, or a second adversary).
"""

import contextlib
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask

from robustft_common.validation import require, require_choice, require_finite_nonnegative
from rxf_src.embedding_noise import EncoderEmbeddingNoise, transformer_encoder

FREELB_NORMS = ("l2", "linf")
# criterions that perturb the token embeddings themselves
REFUSED_CRITERIONS = {
    "sentence_prediction_r3f": "R3F's noisy pass would add its noise on top of the adversarial delta at the "
    "same embeddings; FreeLB + R3F is R3F on perturbed inputs, not a method",
    "sentence_prediction_smart": "SMART runs its own adversarial ascent on the same embeddings",
    "sentence_prediction_neftune": "NEFTune's noise is FreeLB's random start delta_0 (same formula); use "
    "--freelb-init-mag instead",
}


@dataclass
class SentencePredictionFreeLBConfig(SentencePredictionConfig):
    freelb_steps: int = field(default=3, metadata={"help": "K ascent steps; K + 1 forward/backward passes"})
    freelb_adv_lr: float = field(default=6e-2, metadata={"help": "ascent step size (authors' RTE script: 6e-2)"})
    freelb_init_mag: float = field(
        default=1.6e-1, metadata={"help": "magnitude of the random start delta_0 (0: start at delta = 0)"}
    )
    freelb_max_norm: float = field(
        default=1.4e-1, metadata={"help": "bound on delta per sentence (l2 ball / linf box); 0 = unbounded"}
    )
    freelb_norm: ChoiceEnum(list(FREELB_NORMS)) = field(  # type: ignore[valid-type]
        default="l2", metadata={"help": "norm of the step normalisation and of the bound"}
    )
    freelb_no_sync_dropout: bool = field(
        default=False, metadata={"help": "fresh dropout masks in every pass (the fork's --no-sync-dp)"}
    )
    freelb_begin_update: int = field(
        default=0, metadata={"help": "plain training before this update (the fork's --adv-begin-iter)"}
    )


def initial_delta(keep: torch.Tensor, dim: int, init_mag: float, norm: str) -> torch.Tensor:
    """delta_0 (fp32, B x T x dim) from `keep` (B x T x 1, 1 for non-pad tokens), from the global RNG."""
    shape = (*keep.shape[:2], dim)
    if init_mag == 0:
        return torch.zeros(shape, device=keep.device)
    if norm == "l2":
        scale = init_mag / (keep.sum(dim=(1, 2), keepdim=True) * dim).sqrt()
        return (torch.rand(shape, device=keep.device) * 2 - 1) * keep * scale
    return (torch.rand(shape, device=keep.device) * 2 - 1) * init_mag * keep


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, adv_lr: float, max_norm: float, norm: str) -> torch.Tensor:
    """delta + adv_lr * g / ||g||, then the bound; norms per sentence over all its tokens (the fork's rule)."""
    batch = delta.size(0)
    if norm == "l2":
        denom = grad.reshape(batch, -1).norm(dim=1).clamp_min(1e-10).view(-1, 1, 1)
        delta = delta + adv_lr * grad / denom
        if max_norm > 0:
            size = delta.reshape(batch, -1).norm(dim=1).view(-1, 1, 1)
            delta = torch.where(size > max_norm, delta * (max_norm / size), delta)
        return delta
    denom = grad.reshape(batch, -1).abs().amax(dim=1).clamp_min(1e-8).view(-1, 1, 1)
    delta = delta + adv_lr * grad / denom
    return delta.clamp(-max_norm, max_norm) if max_norm > 0 else delta


class _ScaledCriterion:
    """The criterion with its loss divided by the number of passes (what FairseqTask.train_step backpropagates)."""

    def __init__(self, criterion, scale: float):
        self.criterion, self.scale = criterion, scale

    def __call__(self, model, sample):
        loss, sample_size, logging_output = self.criterion(model, sample)
        return loss * self.scale, sample_size, logging_output


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@register_task("sentence_prediction_freelb", dataclass=SentencePredictionFreeLBConfig)
class SentencePredictionFreeLBTask(SentencePredictionTask):
    def __init__(self, cfg: SentencePredictionFreeLBConfig, data_dictionary, label_dictionary):
        super().__init__(cfg, data_dictionary, label_dictionary)
        self.steps, self.adv_lr = int(cfg.freelb_steps), float(cfg.freelb_adv_lr)
        self.init_mag, self.max_norm = float(cfg.freelb_init_mag), float(cfg.freelb_max_norm)
        self.norm, self.sync_dropout = str(cfg.freelb_norm), not cfg.freelb_no_sync_dropout
        self.begin_update = int(cfg.freelb_begin_update)
        require(self.steps >= 1, "--freelb-steps", f"must be an integer >= 1, got {self.steps!r}")
        for flag, value in (
            ("--freelb-adv-lr", self.adv_lr),
            ("--freelb-init-mag", self.init_mag),
            ("--freelb-max-norm", self.max_norm),
        ):
            require_finite_nonnegative(flag, value)
        require_choice("--freelb-norm", self.norm, FREELB_NORMS)
        require(self.begin_update >= 0, "--freelb-begin-update", f"must be >= 0, got {self.begin_update!r}")

    def build_criterion(self, cfg, from_checkpoint=False):
        name = getattr(cfg, "_name", None)
        require(
            name not in REFUSED_CRITERIONS,
            "--criterion",
            f"{name} with --task sentence_prediction_freelb: {REFUSED_CRITERIONS.get(name)}; use "
            "hype_sentence_prediction (with --hype-type none for plain FreeLB) or sentence_prediction",
        )
        return super().build_criterion(cfg, from_checkpoint=from_checkpoint)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if update_num < self.begin_update:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        src_tokens = sample["net_input"]["src_tokens"]
        encoder = transformer_encoder(model, "FreeLB")
        keep = src_tokens.ne(encoder.padding_idx).unsqueeze(-1).float()
        delta = initial_delta(keep, encoder.embed_tokens.embedding_dim, self.init_mag, self.norm)
        rng = _rng_state(src_tokens.device) if self.sync_dropout else None
        passes = self.steps + 1
        scaled = _ScaledCriterion(criterion, 1.0 / passes)
        total_loss, mean_loss = 0.0, 0.0
        for t in range(passes):
            if rng is not None:
                _set_rng_state(src_tokens.device, rng)
            delta.requires_grad_()
            # gradients accumulate locally until the last pass (fairseq trainer.py:821-836 does the same
            # for --update-freq)
            sync = t == passes - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with EncoderEmbeddingNoise(model, src_tokens, method="FreeLB", delta=delta) as hook:
                    loss, sample_size, logging_output = super().train_step(
                        sample, model, scaled, optimizer, update_num, ignore_grad
                    )
            require(hook.fired, "--task", "FreeLB: the forward never embedded the source tokens")
            total_loss = total_loss + loss.detach()
            mean_loss = mean_loss + logging_output["loss"] / passes
            if t < passes - 1:
                delta = self._ascend(delta)
        norms = delta.detach().reshape(delta.size(0), -1).norm(dim=1)
        logging_output = dict(
            logging_output, loss=mean_loss, freelb_delta_norm_num=norms.sum(), freelb_delta_norm_den=norms.numel()
        )
        return total_loss, sample_size, logging_output

    def _ascend(self, delta: torch.Tensor) -> torch.Tensor:
        grad = delta.grad
        if grad is None or not bool(torch.isfinite(grad).all()):  # an fp16 overflow: keep delta
            return delta.detach()
        return ascent_step(delta.detach(), grad, self.adv_lr, self.max_norm, self.norm)
