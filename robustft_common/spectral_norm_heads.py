"""State dicts of spectral-normalised classification heads, and R4F's dense-layer spectral norm.

Pure helpers (no fairseq class is touched here); `robustft_common/fairseq_patches.py` wraps fairseq's
RobertaModel / BARTModel methods with them.

fairseq's `--spectral-norm-classification-head` wraps the head's `out_proj` in
`torch.nn.utils.spectral_norm` (fairseq/models/roberta/model.py:519-524, bart/model.py:312-313), so the
head's state holds `out_proj.weight_orig/_u/_v` instead of `out_proj.weight`, while RobertaModel's and
BARTModel's `upgrade_state_dict_named` read `...out_proj.weight` / `...dense.weight` to size every head
(roberta/model.py:414-419, bart/model.py:182-187): KeyError on every reload (resume, `--restore-file`,
`from_pretrained`). `spectral_norm_aware_upgrade` runs the stock upgrade with
  * each normalised matrix visible under its plain name (`weight_orig` has the same shape), the alias
    removed again afterwards;
  * a checkpoint matrix saved normalised loaded into a plain layer as the normalised matrix it represented
    (W_orig / sigma with the saved u, v: exactly what the layer computed in eval), and a plain matrix loaded
    into a normalised layer as its `weight_orig` (keeping the layer's fresh u, v).

R4F as in the paper normalises the head's `dense` too: `--r4f-spectral-norm-dense`, a flag of the
`sentence_prediction_r3f` criterion. `dense_norm_requested(model_args)` reads it as the model sees its config
(see there), so the head is normalised when it is registered, before the optimizer collects the parameters
and before a checkpoint is loaded into it.

`--r4f-spectral-norm-init-only` (an ablation, not R4F) applies the normalisation once, when training starts:
each head matrix is divided by its exact largest singular value and then trained plain. The head starts
where R4F's does (sigma 1) without R4F's constraint during training, or the 1/sigma R4F's normalisation
puts on the head's gradient. With `--r4f-init-only-scaled-steps` each matrix's optimizer step is then
multiplied by 1/sigma (`scale_steps`): the step R4F's normalisation gives W = W_orig / sigma while sigma stays
at its start, i.e. under Adam (whose step does not scale with the gradient) that matrix's lr x 1/sigma.
"""

from __future__ import annotations

import logging

import torch

from robustft_common.utils import run_setting
from robustft_common.validation import require

logger = logging.getLogger(__name__)

HEAD_MATRICES = ("dense", "out_proj")
DENSE_FLAG = "r4f_spectral_norm_dense"
INIT_ONLY_FLAG = "r4f_spectral_norm_init_only"
_SN_SUFFIXES = ("_orig", "_u", "_v")


def is_spectral_normed(linear: torch.nn.Module) -> bool:
    return hasattr(linear, "weight_orig") and hasattr(linear, "weight_u")


def estimated_sigma(w_orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's spectral_norm (dim 0) estimate of W's largest singular value, u^T W v (fp32)."""
    w = w_orig.float()
    return torch.dot(u.float(), torch.mv(w.reshape(w.size(0), -1), v.float()))


def normalised_weight(w_orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The matrix torch's spectral_norm (dim 0) uses in eval: W / (u^T W v)."""
    return (w_orig.float() / estimated_sigma(w_orig, u, v)).to(w_orig.dtype)


def trained_sigmas(model, head_name: str, plain: bool) -> dict:
    """Per head matrix, the largest singular value of the parameter the optimizer updates: a normalised
    matrix's `weight_orig` (torch's estimate after this forward's power iteration: what the head divides it
    by, free); with `plain`, a plain matrix's `weight` too (exact, one SVD per call: the init-only ablation's
    head scale). fp32."""
    head = model.classification_heads[head_name]
    sigmas = {}
    with torch.no_grad():
        for name in HEAD_MATRICES:
            linear = getattr(head, name)
            if is_spectral_normed(linear):
                sigmas[name] = estimated_sigma(*(getattr(linear, "weight" + s) for s in _SN_SUFFIXES))
            elif plain:
                sigmas[name] = torch.linalg.matrix_norm(linear.weight.float(), ord=2)
    return sigmas


def _head_keys(state_dict, prefix: str):
    heads = prefix + "classification_heads."
    return sorted(
        {
            k[: k.rindex(".")]
            for k in state_dict
            if k.startswith(heads)
            and k.rsplit(".", 1)[-1] in ("weight", "weight_orig")
            and k[len(heads) :].count(".") == 2
        }
    )


def alias_normalised_weights(state_dict, prefix: str) -> list:
    """Expose every head's `weight_orig` as `weight` too (what the stock upgrade reads); returns the aliases."""
    aliases = []
    for module_key in _head_keys(state_dict, prefix):
        if module_key + ".weight_orig" in state_dict and module_key + ".weight" not in state_dict:
            state_dict[module_key + ".weight"] = state_dict[module_key + ".weight_orig"]
            aliases.append(module_key + ".weight")
    return aliases


def remove_aliases(state_dict, aliases) -> None:
    for key in aliases:
        if key[: -len(".weight")] + ".weight_orig" in state_dict:
            state_dict.pop(key, None)


def match_model_form(model, state_dict, prefix: str) -> None:
    """Convert each head matrix of `state_dict` to the form (plain / normalised) of `model`'s layer."""
    heads = getattr(model, "classification_heads", None)
    if heads is None:
        return
    for head_name, head in heads.items():
        for name in HEAD_MATRICES:
            linear = getattr(head, name, None)
            if linear is None:
                continue
            key = f"{prefix}classification_heads.{head_name}.{name}.weight"
            saved_normalised = all(key + s in state_dict for s in _SN_SUFFIXES)
            if is_spectral_normed(linear) and key in state_dict and not saved_normalised:
                logger.info("loading plain %s as weight_orig of a spectral-normalised layer", key)
                state_dict[key + "_orig"] = state_dict.pop(key)
                state_dict[key + "_u"] = linear.weight_u.detach().clone()
                state_dict[key + "_v"] = linear.weight_v.detach().clone()
            elif not is_spectral_normed(linear) and saved_normalised:
                logger.info("loading spectral-normalised %s into a plain layer (W / sigma)", key)
                state_dict[key] = normalised_weight(*(state_dict.pop(key + s) for s in _SN_SUFFIXES))


def dense_norm_requested(model_args) -> bool:
    """`--r4f-spectral-norm-dense` as seen from the model's config (`utils.run_setting`: the criterion's flag
    reaches the model through fairseq-train's namespace or, under hydra, the sibling `criterion:` node). A
    model node detached from its config has no sibling: the criterion then refuses to train
    (`check_dense_normalised`).
    """
    return bool(run_setting(model_args, DENSE_FLAG, f"criterion.{DENSE_FLAG}"))


def normalise_dense(model_args, head: torch.nn.Module) -> None:
    """R4F as in the paper: spectral norm on the head's `dense` as well as on fairseq's `out_proj`."""
    require(
        bool(getattr(model_args, "spectral_norm_classification_head", False)),
        "--r4f-spectral-norm-dense",
        "normalises the head's dense layer on top of R4F; also pass --spectral-norm-classification-head "
        "(hydra: model.spectral_norm_classification_head=true)",
    )
    dense = head.dense
    assert isinstance(dense, torch.nn.Module), "fairseq's classification heads hold `dense` as an nn.Linear"
    if not is_spectral_normed(dense):
        head.dense = torch.nn.utils.spectral_norm(dense)


def init_only_requested(model_args) -> bool:
    """`--r4f-spectral-norm-init-only` as seen from the model's config (as `dense_norm_requested`)."""
    return bool(run_setting(model_args, INIT_ONLY_FLAG, f"criterion.{INIT_ONLY_FLAG}"))


def plain_for_init_only(model_args, head: torch.nn.Module) -> None:
    """`--r4f-spectral-norm-init-only` at registration: R4F's normalised matrices become plain ones holding
    W_orig, so that checkpoints of either form load into them (`match_model_form`); the criterion divides
    them by sigma when training starts (`rescale_to_unit_sigma`), i.e. after the trainer has loaded
    --restore-file, whose head (e.g. a converter's pooler) is what training starts from.

    It runs after fairseq and `normalise_dense` have normalised the head, so the run draws the same random
    numbers as R4F (torch's spectral_norm draws u and v when it is applied).
    """
    require(
        dense_norm_requested(model_args) and bool(getattr(model_args, "spectral_norm_classification_head", False)),
        "--r4f-spectral-norm-init-only",
        "rescales R4F's normalised head once instead of normalising it during training; also pass "
        "--spectral-norm-classification-head --r4f-spectral-norm-dense (hydra: "
        "model.spectral_norm_classification_head=true criterion.r4f_spectral_norm_dense=true)",
    )
    for name in HEAD_MATRICES:
        setattr(head, name, _plain_copy(getattr(head, name)))


def _plain_copy(linear: torch.nn.Linear) -> torch.nn.Linear:
    """A new plain Linear holding `linear`'s W_orig and bias. Not `remove_spectral_norm`: under torch 2.x it
    leaves spectral_norm's load_state_dict pre-hook behind (the hook is stored wrapped, so its isinstance
    test misses it), and every later checkpoint load then asks for `weight_orig`. `skip_init` allocates
    without an init, i.e. draws no random number."""
    state = linear.state_dict()  # detached
    plain = torch.nn.utils.skip_init(
        torch.nn.Linear,
        linear.in_features,
        linear.out_features,
        bias="bias" in state,
        device=state["weight_orig"].device,
        dtype=state["weight_orig"].dtype,
    )
    plain.load_state_dict({"weight": state["weight_orig"], **({"bias": state["bias"]} if "bias" in state else {})})
    return plain


def rescale_to_unit_sigma(model, head_name: str) -> dict:
    """Divide each plain matrix of the head in place by its exact largest singular value (float64); returns
    the values divided by. In place, so an optimizer built later (fp16's fp32 copies included) sees them."""
    head = model.classification_heads[head_name]
    sigmas = {}
    for name in HEAD_MATRICES:
        weight = getattr(head, name).weight
        sigma = torch.linalg.matrix_norm(weight.detach().double(), ord=2)
        with torch.no_grad():
            weight.copy_((weight.double() / sigma).to(weight.dtype))
        sigmas[name] = sigma.item()
    return sigmas


def head_weights(model, head_name: str) -> dict:
    """Copies of the head matrices' weights: where an update starts, for `scale_steps`."""
    head = model.classification_heads[head_name]
    return {name: getattr(head, name).weight.detach().clone() for name in HEAD_MATRICES}


def scale_steps(model, head_name: str, start: dict, scales: dict) -> None:
    """After an optimizer step: W <- start + scale * (W - start) for each head matrix, in place, i.e. the step
    the optimizer took on W times `scales[name]` (biases keep their step: R4F normalises weights only)."""
    head = model.classification_heads[head_name]
    with torch.no_grad():
        for name, scale in scales.items():
            weight = getattr(head, name).weight
            weight.sub_(start[name]).mul_(scale).add_(start[name])


def check_dense_normalised(model, head_name: str) -> None:
    """The criterion's guard: with `--r4f-spectral-norm-dense` the head must already be normalised."""
    head = model.classification_heads[head_name]
    require(
        is_spectral_normed(head.dense),
        "--r4f-spectral-norm-dense",
        f"classification head {head_name!r} was built without it (its dense layer is not "
        "spectral-normalised): the model's config could not see the criterion's flag. Build the model "
        "from the run's whole config (fairseq-train, scripts/hydra_train.py), or set "
        f"model.{DENSE_FLAG}=true",
    )


def check_init_only(model, head_name: str) -> None:
    """The criterion's guard for `--r4f-spectral-norm-init-only`: the head must be plain."""
    head = model.classification_heads[head_name]
    require(
        not any(is_spectral_normed(getattr(head, name)) for name in HEAD_MATRICES),
        "--r4f-spectral-norm-init-only",
        f"classification head {head_name!r} is still spectral-normalised: the model's config could not see the "
        "criterion's flag. Build the model from the run's whole config (fairseq-train, scripts/hydra_train.py), "
        f"or set model.{INIT_ONLY_FLAG}=true",
    )
