"""Mixout (Lee et al., ICLR 2020): while training, each mixed linear layer uses
W~ = U + m * (W - U) / (1 - p), m ~ Bernoulli(1 - p) per input column, U = the pretrained weight.

The authors' code (bloodwass/mixout@18f377d mixout/mixout.py L34-79): one Bernoulli(1 - p) row of length
`in_features` per forward, repeated over the output rows (all outgoing weights of a dropped input neuron
revert to the target), shared by the whole batch; E[W~] = W; eval or p = 0 gives W. Only `weight` is
mixed, the bias is not. Its backward returns grad * m although dW~/dW = m / (1 - p): its gradients are
(1 - p) times the true ones. `--mixout-grad exact` (default) back-propagates the true gradient,
`reference` the code's; Adam is invariant to that scale up to its eps, gradient clipping is not.

Why a model-side mechanism installed when the model is built, with the target in the state dict:
the pretrained weights arrive after `task.build_model` (`--restore-file` / `--finetune-from-model` in
`trainer.load_checkpoint`, fairseq/trainer.py:585), and a resumed run must mix towards the same U as
the run it continues, not towards its own checkpoint's W. So the patch `fairseq_patches.mixout_at_model_build`
installs Mixout right after `fairseq.models.build_model`, with U as a buffer saved as `<linear>.mixout_target`
beside the stock `<linear>.weight`. Loading a checkpoint without targets (a pretrained model) sets U to the
loaded weights; loading one with targets (resume, or a Mixout run's checkpoint) restores them.

Why `torch.nn.utils.parametrize`: fairseq's MultiheadAttention hands `q_proj.weight` ... `out_proj.weight`
straight to `F.multi_head_attention_forward` in training (fairseq/modules/multihead_attention.py:539-561),
bypassing the projections' own forward; a parametrized `weight` is mixed wherever it is read. State-dict
hooks keep the stock key names (`weight`, plus `mixout_target`), so checkpoints stay loadable by a model
built with the same flags (inference rebuilds it from the checkpoint's config, Mixout included; eval = W).

The flags (`MixoutConfig`) are a mixin of the sentence-prediction criterions, like HyPe's; the criterion
itself does nothing (the model carries Mixout). The mask is drawn from torch's global RNG like dropout,
so fairseq's per-update reseeding makes resumed runs bit-exact.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from torch import nn
from torch.nn.utils import parametrize

from robustft_common.param_filters import compile_pattern
from robustft_common.utils import run_setting, unwrap_model
from robustft_common.validation import require, require_choice

logger = logging.getLogger(__name__)

MIXOUT_GRADS = ("exact", "reference")
# every nn.Linear inside a Transformer layer: RoBERTa `encoder.sentence_encoder.layers.N.{self_attn.q_proj,
# ..., fc1, fc2}`, BART / transformer `encoder.layers.N.*` and `decoder.layers.N.*`
TRANSFORMER_LAYERS = r"(^|\.)layers\.\d+\."
TARGET_KEY = "mixout_target"  # <linear>.mixout_target in the state dict
# the optimizers whose per-entry sensitivity |theta * g| Mixout's zero-gradient columns would corrupt
SENSITIVITY_OPTIMIZERS = ("adamax_pats", "adamax_sage")
_ORIGINAL = "parametrizations.weight.original"  # torch's key of the parametrized tensor
_TARGET = "parametrizations.weight.0.target"


@dataclass
class MixoutConfig(FairseqDataclass):
    mixout_p: float = field(
        default=0.0,
        metadata={
            "help": "Mixout probability p in [0, 1): while training, each forward reverts a random p share of "
            "every mixed linear layer's input columns to the pretrained weights, rescaled so that E[W~] = W "
            "(the authors' examples: 0.9 with dropout 0); 0 = off"
        },
    )
    mixout_layers: str = field(
        default=TRANSFORMER_LAYERS,
        metadata={
            "help": "regex (re.search) over module names: the nn.Linear layers Mixout mixes (default: every "
            "linear of the Transformer layers; classification heads have no pretrained target)"
        },
    )
    mixout_grad: ChoiceEnum(list(MIXOUT_GRADS)) = field(  # type: ignore[valid-type]
        default="exact",
        metadata={
            "help": "exact: the gradient of W~ = U + m (W - U) / (1 - p); reference: the authors' code's grad * m "
            "((1 - p) times smaller)"
        },
    )


class MixoutSettings(NamedTuple):
    p: float
    layers: str
    reference_grad: bool

    @property
    def enabled(self) -> bool:
        return self.p > 0


def mixout_settings(cfg) -> MixoutSettings:
    """Validate the `--mixout-*` flags of a config (any object with those attributes; missing = default)."""
    return _validated(
        getattr(cfg, "mixout_p", 0.0),
        getattr(cfg, "mixout_layers", TRANSFORMER_LAYERS),
        str(getattr(cfg, "mixout_grad", "exact")),
    )


def _validated(p, layers: str, grad: str) -> MixoutSettings:
    require(
        p is not None and math.isfinite(p) and 0.0 <= p < 1.0,
        "--mixout-p",
        f"must be in [0, 1) (1 would freeze the mixed layers at their targets), got {p!r}",
    )
    require_choice("--mixout-grad", grad, MIXOUT_GRADS)
    compile_pattern("--mixout-layers", layers)
    # the other flags without p would silently train without Mixout
    set_flags = [
        f for f, v, d in (("--mixout-layers", layers, TRANSFORMER_LAYERS), ("--mixout-grad", grad, "exact")) if v != d
    ]
    require(p > 0 or not set_flags, "--mixout-p", f"{'/'.join(set_flags)} set but --mixout-p is 0 (Mixout off)")
    return MixoutSettings(float(p), str(layers), grad == "reference")


class _Mix(torch.autograd.Function):
    """W~ = U + (W - U) * scale (scale = m / (1 - p), one value per input column); dW = grad * grad_scale.

    Saves only the column vector for backward (the authors' Function keeps a weight-sized mask)."""

    @staticmethod
    def forward(ctx, weight, target, scale, grad_scale):
        ctx.save_for_backward(grad_scale)
        return torch.lerp(target, weight, scale)  # U + scale * (W - U) in one pass (3 passes unfused)

    @staticmethod
    def backward(ctx, grad):
        (grad_scale,) = ctx.saved_tensors
        return grad * grad_scale, None, None, None


class MixoutState:
    """Per-model bookkeeping: the settings, the mixed layers' names, where their targets came from."""

    def __init__(self, settings: MixoutSettings, names: list[str]):
        self.settings = settings
        self.names = names
        self.source = "init"  # init | checkpoint weights | saved targets
        self._announced = False

    def announce(self) -> None:
        """Once, at the first training forward: what the layers mix towards."""
        if self._announced:
            return
        self._announced = True
        if self.source == "init":
            logger.warning(
                "Mixout: no checkpoint was loaded, so the %d layers mix towards their random initialisation; "
                "Mixout regularises towards pretrained weights (--restore-file / --finetune-from-model)",
                len(self.names),
            )
        else:
            logger.info("Mixout: the %d layers mix towards the %s", len(self.names), self.source)


class MixoutWeight(nn.Module):
    """The parametrization of one linear layer's `weight` (its `target` buffer is U)."""

    def __init__(self, target: torch.Tensor, state: MixoutState):
        super().__init__()
        self.register_buffer("target", target.detach().clone())
        self.__dict__["state"] = state  # shared, not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        state: MixoutState = self.__dict__["state"]
        if not self.training:
            return weight
        state.announce()
        p = state.settings.p
        keep = torch.empty(weight.size(-1), dtype=weight.dtype, device=weight.device).bernoulli_(1.0 - p)
        scale = keep / (1.0 - p)
        return _Mix.apply(weight, self.target, scale, keep if state.settings.reference_grad else scale)


def _save_stock_keys(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "weight"] = state_dict.pop(prefix + _ORIGINAL)
    state_dict[prefix + TARGET_KEY] = state_dict.pop(prefix + _TARGET)


def _load_stock_keys(state: MixoutState):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = prefix + "weight"
        if weight not in state_dict:
            return  # torch reports the missing key
        target = state_dict.pop(prefix + TARGET_KEY, None)
        state.source = "checkpoint weights" if target is None else "saved targets"
        state_dict[prefix + _TARGET] = state_dict[weight] if target is None else target
        state_dict[prefix + _ORIGINAL] = state_dict.pop(weight)

    return hook


def install_mixout(model: nn.Module, settings: MixoutSettings) -> MixoutState | None:
    """Parametrize the selected linear layers of `model` (none when p = 0); raises naming the flag when the
    regex selects nothing. Idempotent: a model that already carries Mixout is left as it is."""
    model = unwrap_model(model)
    if not settings.enabled or "_mixout_state" in model.__dict__:
        return model.__dict__.get("_mixout_state")
    regex = compile_pattern("--mixout-layers", settings.layers)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(n, m) for n, m in linears if regex is not None and regex.search(n)]
    require(
        bool(chosen),
        "--mixout-layers",
        f"{settings.layers!r} matches no nn.Linear of {type(model).__name__}; linear layers are named like "
        f"{', '.join(n for n, _ in linears[:4])}",
    )
    state = MixoutState(settings, [n for n, _ in chosen])
    for _, linear in chosen:
        parametrize.register_parametrization(linear, "weight", MixoutWeight(linear.weight, state), unsafe=True)
        linear.register_state_dict_post_hook(_save_stock_keys)
        linear.register_load_state_dict_pre_hook(_load_stock_keys(state))
    model.__dict__["_mixout_state"] = state
    logger.info(
        "Mixout: p=%g (%s gradient) on %d linear layers, e.g. %s",
        settings.p,
        "reference" if settings.reference_grad else "exact",
        len(chosen),
        ", ".join(state.names[:3]),
    )
    return state


def mixout_state(model: nn.Module) -> MixoutState | None:
    """The model's Mixout bookkeeping, None without Mixout."""
    return unwrap_model(model).__dict__.get("_mixout_state")


def require_installed(model: nn.Module, settings: MixoutSettings) -> None:
    """For criterions, at the first training forward: a run with `--mixout-p` trains a model that carries
    Mixout (a model built outside `fairseq.models.build_model`, e.g. by hand, would silently train without)."""
    state = mixout_state(model)
    require(
        not settings.enabled or state is not None,
        "--mixout-p",
        f"{settings.p} set but the model carries no Mixout: it was not built by fairseq.models.build_model "
        "with the plugin imported (call robustft_common.mixout.install_mixout(model, settings) yourself)",
    )
    require(
        state is None or state.settings == settings,
        "--mixout-p",
        f"the model carries Mixout {state.settings if state else None}, the criterion asks for {settings}",
    )


def install_from_model_args(model: nn.Module, model_args) -> None:
    """What `fairseq_patches.mixout_at_model_build` runs after `fairseq.models.build_model`: Mixout when the
    run's criterion asks for it (`--mixout-p` > 0), refused next to the sensitivity-based optimizers."""
    p = run_setting(model_args, "mixout_p", "criterion.mixout_p")
    if not p:
        return
    settings = _validated(
        p,
        run_setting(model_args, "mixout_layers", "criterion.mixout_layers") or TRANSFORMER_LAYERS,
        str(run_setting(model_args, "mixout_grad", "criterion.mixout_grad") or "exact"),
    )
    optimizer = run_setting(model_args, "optimizer", "optimizer._name")
    require(
        str(optimizer) not in SENSITIVITY_OPTIMIZERS,
        "--mixout-p",
        f"Mixout does not compose with --optimizer {optimizer}: the input columns it reverts get a zero "
        "gradient in that step, which the optimizer's sensitivity |theta * g| reads as insensitive "
        "(more PATS noise / a different SAGE step) and NoisyTune's perturbation would be mixed back "
        "towards the unperturbed targets; use adam or adamax",
    )
    install_mixout(model, settings)
