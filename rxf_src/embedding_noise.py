"""Put R3F's noise into a fairseq Transformer encoder's token embeddings for one forward of the model.

Why hooks and not `token_embeddings=`: RoBERTa's encoder forward drops `token_embeddings`
(`RobertaEncoder.forward` -> `extract_features` without it), so fairseq's reference noisy pass is a clean
pass. A forward hook on a module of the encoder works for RoBERTa/XLM-R, BART (classification and
seq2seq) and the plain transformer alike, and only ever touches the encoder (BART's decoder has its own
`layernorm_embedding`; a shared `embed_tokens` is only noised for this call's `src_tokens`).

Which calls: every time the encoder embeds the source inside the noisy forward, with ONE noise tensor z
drawn at the first call. R3F perturbs the model's input, f(x) -> f(x + z); a model that embeds x more than
once per forward (hyperdecoder's `--encoder-adapter generated` runs the encoder twice: pass 1 conditions
the adapter generator, the decoder reads pass 2) must see x + z at every use, as `token_embeddings=E + z`
would give it (`HyperdecoderEncoder.forward_scriptable` hands that argument to both passes). Noising only
the first call left the pass the decoder reads clean.

Where: fairseq's `forward_embedding` computes `layernorm_embedding(embed_scale * E + positions)`.
Noise z on E is the same as `embed_scale * z` on the layer norm's input, so when the encoder has
`layernorm_embedding` (RoBERTa, XLM-R, BART) the noise is added there, in fp32, and the layer norm is run
in fp32 too: the sum is only rounded to the model's dtype after the layer norm, where the values are
O(1). Without `layernorm_embedding` the noise is added to the embedding lookup (fp32 add, cast back).
Either way the fraction of non-pad entries that really changed at that point is counted, summed over
every noised call (so a second encoder pass is counted too).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from hype_src.perturbation import validate_hype_config
from robustft_common.noise import add_noise, sample_noise, validate_noise_flags
from robustft_common.utils import unwrap_model
from robustft_common.validation import require_choice, require_finite_nonnegative

# the reference's two distributions (HyPe's one-sided uniform is not an R3F option)
R3F_NOISE_TYPES = ("uniform", "normal")


def validate_r3f_flags(cfg) -> None:
    """Startup checks shared by both R3F criterions (and their --hype-* flags)."""
    validate_noise_flags("--noise-type", cfg.noise_type, "--eps", cfg.eps)
    require_choice("--noise-type", cfg.noise_type, R3F_NOISE_TYPES)
    require_finite_nonnegative("--r3f-lambda", cfg.r3f_lambda)
    validate_hype_config(cfg)


def transformer_encoder(model, method: str = "R3F"):
    """The fairseq TransformerEncoder that embeds the source tokens (RoBERTa wraps it)."""
    model = unwrap_model(model)  # data-parallel wrappers
    encoder = getattr(model, "encoder", None)
    encoder = getattr(encoder, "sentence_encoder", encoder)  # RoBERTa / XLM-R
    if encoder is None or not hasattr(encoder, "embed_tokens") or not hasattr(encoder, "forward_embedding"):
        raise ValueError(
            f"{method} needs a model whose encoder is a fairseq TransformerEncoder with `embed_tokens` "
            f"(RoBERTa, XLM-R, BART, transformer); got {type(model).__name__}"
        )
    return encoder


def _is_layer_norm(module) -> bool:
    return all(hasattr(module, a) for a in ("normalized_shape", "weight", "bias", "eps"))


def _draw(like: torch.Tensor, eps: Union[float, torch.Tensor], noise_type: str) -> torch.Tensor:
    """Noise of `like`'s shape; a tensor `eps` (per-sentence scales, B x 1 x 1) scales unit noise."""
    if isinstance(eps, torch.Tensor):
        return sample_noise(like, 1.0, noise_type).mul_(eps)
    return sample_noise(like, eps, noise_type)


class EncoderEmbeddingNoise:
    """Context manager: every encoder embedding of `src_tokens` inside it gets the same noise z.

    z is drawn (fp32, on the embeddings' device) at the first such embedding and reused at every later one,
    so a model that runs its encoder more than once per forward sees one perturbed input x + z.
    After the forward, `changed` / `total` are 0-dim tensors summed over the `calls` noised embeddings:
    non-pad embedding entries the noise changed at the point where the model consumes them, and all
    non-pad entries.

    `eps` is a number, or a B x 1 x 1 tensor of per-sentence scales (NEFTune's per-sentence length); `method`
    names the method in errors (NEFTune uses this mechanism too, baselines_src/neftune.py). `delta`, a given
    fp32 B x T x C perturbation in token-embedding units, replaces the sampled noise (FreeLB and SMART ascend
    on it: the gradient reaches it through the hook), and `eps` / `noise_type` are then unused.
    """

    def __init__(
        self,
        model,
        src_tokens: torch.Tensor,
        eps: Union[float, torch.Tensor] = 0.0,
        noise_type: str = "uniform",
        method: str = "R3F",
        delta: Optional[torch.Tensor] = None,
    ):
        self.method = method
        self.encoder = transformer_encoder(model, method)
        self.src_tokens = src_tokens
        self.delta = delta
        self.eps = 1.0 if delta is not None else eps  # with delta, the hooks pass embed_scale as `eps`
        self.noise_type = noise_type
        self.noise: Optional[torch.Tensor] = None  # z, fp32, at the hooked point (scaled by embed_scale there)
        self.calls = 0
        self.changed: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None
        self._handle = None

    @property
    def fired(self) -> bool:
        return self.calls > 0

    def __enter__(self):
        layer_norm = getattr(self.encoder, "layernorm_embedding", None)
        if layer_norm is not None and _is_layer_norm(layer_norm):
            self._handle = layer_norm.register_forward_hook(self._noise_layer_norm_input)
        else:
            self._handle = self.encoder.embed_tokens.register_forward_hook(self._noise_lookup)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def _sample_once(self, like: torch.Tensor, eps: Union[float, torch.Tensor]) -> torch.Tensor:
        """The one noise tensor of this forward: drawn at the first call, the same z afterwards."""
        if like.shape[:-1] != self.src_tokens.shape:
            # forward_embedding embeds B x T src_tokens as B x T x C (fairseq transformer_encoder.py:124-129)
            raise RuntimeError(
                f"{self.method}: the encoder embedded a {tuple(like.shape)} input inside the noisy forward of the "
                f"{tuple(self.src_tokens.shape)} source batch; {self.method} noises one source batch per forward"
            )
        if self.noise is None and self.delta is not None:  # a given perturbation, times embed_scale
            self.noise = self.delta if eps == 1.0 else self.delta * eps
        elif self.noise is None:
            self.noise = _draw(like, eps, self.noise_type)
        return self.noise

    def _count(self, noisy: torch.Tensor, clean: torch.Tensor) -> None:
        pad = getattr(self.encoder, "padding_idx", None)
        keep = self.src_tokens.ne(pad) if pad is not None else torch.ones_like(self.src_tokens, dtype=torch.bool)
        keep = keep.unsqueeze(-1)
        changed = ((noisy != clean) & keep).sum()
        total = keep.sum() * clean.size(-1)
        self.changed = changed if self.changed is None else self.changed + changed
        self.total = total if self.total is None else self.total + total
        self.calls += 1

    def _noise_layer_norm_input(self, module, inputs, output):
        x = inputs[0]
        scale = float(getattr(self.encoder, "embed_scale", 1.0) or 1.0)
        noisy_input = x.float() + self._sample_once(x, self.eps * scale)
        weight = None if module.weight is None else module.weight.float()
        bias = None if module.bias is None else module.bias.float()
        noisy = F.layer_norm(noisy_input, tuple(module.normalized_shape), weight, bias, module.eps)
        noisy = noisy.to(output.dtype)
        self._count(noisy, output)
        return noisy

    def _noise_lookup(self, module, inputs, output):
        # a shared embedding table also embeds the decoder's tokens: only noise this source batch
        if inputs[0] is not self.src_tokens:
            return None
        noisy, _ = add_noise(output, self._sample_once(output, self.eps))
        self._count(noisy, output)
        return noisy


def noised_forward(
    model,
    src_tokens: torch.Tensor,
    eps: Union[float, torch.Tensor],
    noise_type: str,
    forward,
    method: str = "R3F",
):
    """Run `forward()` with R3F noise on the encoder's embeddings (one z for every encoder pass of this
    forward); return (its output, the noise context: `changed` / `total` for `r3f_noise_effective`).

    Fails loudly when the forward never embedded `src_tokens`: a silent clean "noisy" pass is the
    reference implementation's defect.
    """
    with EncoderEmbeddingNoise(model, src_tokens, eps, noise_type, method) as noise:
        output = forward()
    if not noise.fired:
        raise RuntimeError(
            f"{method}: the noisy forward never embedded the source tokens; the noise did not reach the encoder"
        )
    return output, noise
