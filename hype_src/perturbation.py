"""HyPe hidden-representation perturbation, the mechanism of every criterion that composes with HyPe.

HyPe (Yuan et al., ACL 2023) adds fresh i.i.d. noise to the hidden representation fed into every
Transformer layer while training: the first layer's input (embedding output after its layernorm and
dropout) and every inter-layer state, but not the last layer's output. Here it is a forward pre-hook
on each layer, so the encoder's own variables (and the `encoder_states` it returns) stay clean and
eval (`module.training` False) is untouched, bit for bit.

Usage, for any criterion: inherit `HypeConfig` in the criterion's config and run the whole of `forward`
inside `with hype_forward(model, cfg) as hype:` (attaches the hooks, idempotent and cheap; counts the
noise of every pass inside the block, and only those), then merge `hype.logging_output` into the logging
output (logged as the ratio `hype_noise_effective`, the fraction of perturbed entries that the noise
actually changed after the cast to the activation dtype; ~1.0 in fp32, far less under `--fp16` with a
small `--hype-eps`; nothing in eval, which adds no noise).
"""

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from torch import nn

from robustft_common.noise import add_noise, sample_noise
from robustft_common.utils import unwrap_model
from robustft_common.validation import require, require_choice, require_finite_nonnegative

logger = logging.getLogger(__name__)

HYPE_TYPES = ("none", "normal", "uniform")
HYPE_UNIFORM_RANGES = ("symmetric", "one_sided")


@dataclass
class HypeConfig(FairseqDataclass):
    hype_type: ChoiceEnum(list(HYPE_TYPES)) = field(
        default="none",
        metadata={
            "help": "HyPe noise on every Transformer layer's input while training: "
            "none (off), normal N(0, eps^2), uniform (see --hype-uniform)"
        },
    )
    hype_eps: float = field(
        default=1e-5,
        metadata={"help": "HyPe noise scale (std for normal, half-width or width for uniform), absolute, per element"},
    )
    hype_uniform: ChoiceEnum(list(HYPE_UNIFORM_RANGES)) = field(
        default="symmetric",
        metadata={
            "help": "range of --hype-type uniform: symmetric U(-eps, eps) as in the "
            "paper, or one_sided U[0, eps) as in the official code"
        },
    )
    hype_intermediate: bool = field(
        default=False,
        metadata={
            "help": "also perturb the post-attention representation (output of the "
            "post-LN self_attn_layer_norm, input of the FFN) of every layer"
        },
    )
    hype_only_intermediate: bool = field(
        default=False,
        metadata={
            "help": "perturb only the post-attention representation, not the layer inputs (implies --hype-intermediate)"
        },
    )
    hype_top_layers: int = field(
        default=0,
        metadata={
            "help": "perturb the inputs of the top k layers only (0: all layers); combined "
            "with --hype-low-layers the union is perturbed"
        },
    )
    hype_low_layers: int = field(
        default=0, metadata={"help": "perturb the inputs of the bottom k layers only (0: all layers)"}
    )
    hype_decoder: bool = field(
        default=False,
        metadata={
            "help": "encoder-decoder models: also perturb the decoder layers "
            "(model.decoder.layers); the encoder is always perturbed"
        },
    )


class HypeSettings(NamedTuple):
    """The validated, hashable form of the `--hype-*` flags (also the idempotency key)."""

    noise_type: str  # robustft_common.noise type, or "none"
    eps: float
    layer_inputs: bool
    intermediate: bool
    top_layers: int
    low_layers: int
    decoder: bool

    @property
    def enabled(self) -> bool:
        return self.noise_type != "none"


def hype_settings(cfg) -> HypeSettings:
    """Validate the `--hype-*` flags of a config (any object with those attributes; missing = default)."""
    get: Callable[[str, Any], Any] = lambda name, default: getattr(cfg, name, default)  # noqa: E731
    hype_type = str(get("hype_type", "none"))
    eps = get("hype_eps", 1e-5)
    uniform = str(get("hype_uniform", "symmetric"))
    intermediate, only_intermediate = bool(get("hype_intermediate", False)), bool(get("hype_only_intermediate", False))
    top, low = get("hype_top_layers", 0), get("hype_low_layers", 0)
    decoder = bool(get("hype_decoder", False))

    require_choice("--hype-type", hype_type, HYPE_TYPES)
    require_finite_nonnegative("--hype-eps", eps)
    require_choice("--hype-uniform", uniform, HYPE_UNIFORM_RANGES)
    for flag, k in (("--hype-top-layers", top), ("--hype-low-layers", low)):
        require(isinstance(k, int) and k >= 0, flag, f"must be an integer >= 0 (0 = all layers), got {k!r}")
    if hype_type == "none":
        # Any other --hype-* flag without a type would silently train without HyPe.
        set_flags = [
            flag
            for flag, value, default in (
                ("--hype-eps", eps, 1e-5),
                ("--hype-uniform", uniform, "symmetric"),
                ("--hype-intermediate", intermediate, False),
                ("--hype-only-intermediate", only_intermediate, False),
                ("--hype-top-layers", top, 0),
                ("--hype-low-layers", low, 0),
                ("--hype-decoder", decoder, False),
            )
            if value != default
        ]
        require(
            not set_flags,
            "--hype-type",
            f"{'/'.join(set_flags)} set but --hype-type is none (HyPe off); add --hype-type normal "
            f"or uniform, or drop them",
        )
        return HypeSettings("none", float(eps), False, False, 0, 0, False)
    require(
        uniform == "symmetric" or hype_type == "uniform",
        "--hype-uniform",
        f"{uniform} only applies to --hype-type uniform, got --hype-type {hype_type}",
    )
    require(
        not (only_intermediate and (top or low)),
        "--hype-only-intermediate",
        "turns the layer-input noise off, which --hype-top-layers / --hype-low-layers restrict; drop one of them",
    )
    if hype_type == "uniform":
        noise_type = "uniform" if uniform == "symmetric" else "uniform_one_sided"
    else:
        noise_type = "normal"
    return HypeSettings(
        noise_type, float(eps), not only_intermediate, intermediate or only_intermediate, int(top), int(low), decoder
    )


def validate_hype_config(cfg) -> HypeSettings:
    """Startup check for criterions: raises ValueError naming the bad `--hype-*` flag."""
    return hype_settings(cfg)


def layer_stacks(model: nn.Module, decoder: bool = False) -> List[Tuple[str, Sequence[nn.Module]]]:
    """(name, layers) of the Transformer stacks HyPe perturbs: RoBERTa `encoder.sentence_encoder.layers`,
    BART / transformer / hyperdecoder `encoder.layers` (+ `decoder.layers` when `decoder`)."""
    model = unwrap_model(model)
    stacks = []
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        inner = getattr(encoder, "sentence_encoder", None)
        inner = encoder if inner is None else inner
        layers = getattr(inner, "layers", None)
        if layers is not None and len(layers) > 0:
            stacks.append(("encoder", layers))
    if decoder:
        layers = getattr(getattr(model, "decoder", None), "layers", None)
        require(
            layers is not None and len(layers) > 0,
            "--hype-decoder",
            f"{type(model).__name__} has no decoder layers (model.decoder.layers); drop the flag",
        )
        stacks.append(("decoder", layers))
    require(
        bool(stacks),
        "--hype-type",
        f"found no Transformer layers in {type(model).__name__} "
        "(looked for encoder.sentence_encoder.layers, encoder.layers)",
    )
    return stacks


class _HypeState:
    """Per-model HyPe bookkeeping: hook handles and the noise-effectiveness counts of the current step."""

    def __init__(self, settings: HypeSettings):
        self.settings = settings
        self.handles: List = []
        self.changed: int | torch.Tensor = 0  # becomes a 0-dim tensor on the activations' device (no host sync)
        self.total = 0
        self.checked_dtypes = {torch.float32, torch.float64}

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self.checked_dtypes:
            self.checked_dtypes.add(x.dtype)
            warn_if_noise_vanishes(self.settings.eps, x.dtype)
        noisy, changed = add_noise(x, sample_noise(x, self.settings.eps, self.settings.noise_type))
        self.changed = self.changed + changed
        self.total += x.numel()
        return noisy

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class _LayerInputNoise:
    """Forward pre-hook: perturb a layer's input `x` (positional or keyword) while training."""

    def __init__(self, state: _HypeState):
        self.state = state

    def __call__(self, module, args, kwargs):
        if not module.training:
            return None
        if args:
            return (self.state.perturb(args[0]),) + tuple(args[1:]), kwargs
        if "x" in kwargs:
            return args, dict(kwargs, x=self.state.perturb(kwargs["x"]))
        return None


class _OutputNoise:
    """Forward hook: perturb a module's output while training (the post-attention representation)."""

    def __init__(self, state: _HypeState):
        self.state = state

    def __call__(self, module, args, output):
        if not module.training:
            return None
        return self.state.perturb(output)


def _intermediate_norm(layer: nn.Module, stack: str, index: int) -> nn.Module:
    """The post-LN layernorm whose output feeds the FFN and its residual (decoder: after cross-attention)."""
    require(
        not getattr(layer, "normalize_before", False),
        "--hype-intermediate",
        f"{stack} layer {index} is pre-LN (normalize_before): its post-attention state has no module "
        "output to hook; use the layer-input noise only",
    )
    norm = getattr(layer, "encoder_attn_layer_norm", None)
    norm = getattr(layer, "self_attn_layer_norm", None) if norm is None else norm
    require(
        norm is not None,
        "--hype-intermediate",
        f"{stack} layer {index} ({type(layer).__name__}) has no self_attn_layer_norm",
    )
    assert norm is not None  # `require` above raised otherwise
    return norm


def _selected(n_layers: int, top: int, low: int) -> List[int]:
    if not top and not low:
        return list(range(n_layers))
    return sorted(set(range(n_layers - top, n_layers)) | set(range(low)))


def attach_hype(model: nn.Module, cfg) -> None:
    """Install HyPe on `model` from the `--hype-*` flags of `cfg` (a config, or the `HypeSettings`
    that `validate_hype_config` returned, which skips re-reading the config at every forward).

    Idempotent and cheap when called at every forward; re-installs if the flags changed; removes the
    hooks (vanilla model) when `cfg.hype_type == "none"`. Raises ValueError naming the flag when the
    flags do not fit the model (e.g. --hype-top-layers past its depth).
    """
    model = unwrap_model(model)
    settings = cfg if isinstance(cfg, HypeSettings) else hype_settings(cfg)
    state: Optional[_HypeState] = model.__dict__.get("_hype_state")
    if state is not None:
        if state.settings == settings:
            return
        state.remove()
        model.__dict__.pop("_hype_state")
    if not settings.enabled:
        return
    stacks = layer_stacks(model, settings.decoder)
    for name, layers in stacks:
        for flag, k in (("--hype-top-layers", settings.top_layers), ("--hype-low-layers", settings.low_layers)):
            require(k <= len(layers), flag, f"{k} exceeds the {len(layers)} {name} layers of {type(model).__name__}")
    state = _HypeState(settings)
    for name, layers in stacks:
        if settings.layer_inputs:
            for i in _selected(len(layers), settings.top_layers, settings.low_layers):
                state.handles.append(layers[i].register_forward_pre_hook(_LayerInputNoise(state), with_kwargs=True))
        if settings.intermediate:
            for i, layer in enumerate(layers):
                state.handles.append(_intermediate_norm(layer, name, i).register_forward_hook(_OutputNoise(state)))
    model.__dict__["_hype_state"] = state
    params = next(model.parameters(), None)
    if params is not None:
        warn_if_noise_vanishes(settings.eps, params.dtype)
    logger.info(
        "HyPe: %s noise, eps %g, on %s",
        settings.noise_type,
        settings.eps,
        ", ".join(f"{len(layers)} {name} layers" for name, layers in stacks),
    )


def detach_hype(model: nn.Module) -> None:
    """Remove HyPe's hooks from `model` (no-op if none)."""
    state = unwrap_model(model).__dict__.pop("_hype_state", None)
    if state is not None:
        state.remove()


def hype_logging_output(model: nn.Module) -> Dict[str, object]:
    """`hype_noise_effective_num` / `_den` (entries changed / entries perturbed) since the last call,
    then reset; {} when HyPe is off. Criterions use `hype_forward`, which scopes the count to one call.
    The ratio `hype_noise_effective` is logged by `log_ratio_pairs`; den is 0 in eval (no noise), so
    nothing is logged there."""
    state: Optional[_HypeState] = unwrap_model(model).__dict__.get("_hype_state")
    if state is None:
        return {}
    out: Dict[str, object] = {"hype_noise_effective_num": state.changed, "hype_noise_effective_den": state.total}
    state.changed, state.total = 0, 0
    return out


class HypeCount:
    """What `hype_forward` counted: `logging_output` is filled when its block exits."""

    def __init__(self):
        self.logging_output: Dict[str, object] = {}


@contextlib.contextmanager
def hype_forward(model: nn.Module, cfg) -> Iterator[HypeCount]:
    """One criterion call under HyPe: attach it (`attach_hype(model, cfg)`) and count the noise of exactly
    the passes run inside the block (the clean pass and, e.g., R3F's noisy pass).

    Counts left by forwards outside any criterion call are dropped on entry, so nothing a training step
    perturbed is reported with the next call (which can be a validation batch, adding no noise).
    """
    attach_hype(model, cfg)
    hype_logging_output(model)  # drop what earlier forwards left
    count = HypeCount()
    try:
        yield count
    finally:
        count.logging_output = hype_logging_output(model)


_WARNED: set[Tuple[torch.dtype, float]] = set()  # (dtype, eps) pairs already warned about


def noise_resolution(dtype: torch.dtype) -> float:
    """Spacing of `dtype` just above 1.0: noise well below it vanishes on O(1) activations."""
    return torch.finfo(dtype).eps


def warn_if_noise_vanishes(eps: float, dtype: torch.dtype) -> bool:
    """Warn (once per dtype and eps) when eps is below the resolution of O(1) activations in `dtype`."""
    if not dtype.is_floating_point or dtype in (torch.float32, torch.float64) or not math.isfinite(eps):
        return False
    resolution = noise_resolution(dtype)
    if eps >= resolution or (dtype, eps) in _WARNED:
        return False
    _WARNED.add((dtype, eps))
    logger.warning(
        "HyPe: --hype-eps %g is below the %s resolution of O(1) activations (%.1e): most of the noise "
        "rounds away (see hype_noise_effective). Train with --amp (fp32 residual stream) or in fp32, or "
        "raise --hype-eps; otherwise report HyPe as inactive.",
        eps,
        str(dtype).replace("torch.", ""),
        resolution,
    )
    return True
