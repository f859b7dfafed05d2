"""R4F: checkpoints of spectral-normalised classification heads that resume and load, and the paper's
variant that also normalises the head's dense layer.

fairseq's `--spectral-norm-classification-head` wraps `out_proj` in `torch.nn.utils.spectral_norm`, so the
head's state holds `out_proj.weight_orig/_u/_v` instead of `out_proj.weight`; RobertaModel's and BARTModel's
`upgrade_state_dict_named` read `...out_proj.weight` to size the head and raise KeyError on every reload
(resume, `--restore-file`, `from_pretrained`). Importing this module wraps those two methods (once,
idempotently) so that:
  * while the stock upgrade runs, each normalised matrix is visible under its plain name (`weight_orig`
    has the same shape), and the alias is removed again afterwards;
  * a checkpoint matrix saved normalised is loaded into a plain module as the normalised matrix it
    represented (W_orig / sigma with the saved u, v: exactly what the module computed in eval), and a plain
    matrix loaded into a normalised module becomes its `weight_orig` (keeping the module's fresh u, v).
It also wraps `register_classification_head` so that `--r4f-spectral-norm-dense` (a flag of
`sentence_prediction_r3f`, visible in the model's args) normalises `dense` too.
"""
from __future__ import annotations

import functools
import logging

import torch
from fairseq.models.bart.model import BARTModel
from fairseq.models.roberta.model import RobertaModel

from robustft_common.validation import require

logger = logging.getLogger(__name__)

HEAD_MATRICES = ("dense", "out_proj")
_SN_SUFFIXES = ("_orig", "_u", "_v")


def is_spectral_normed(linear: torch.nn.Module) -> bool:
    return hasattr(linear, "weight_orig") and hasattr(linear, "weight_u")


def _normalised_weight(w_orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The matrix torch's spectral_norm (dim 0) uses in eval: W / (u^T W v)."""
    w = w_orig.float()
    sigma = torch.dot(u.float(), torch.mv(w.reshape(w.size(0), -1), v.float()))
    return (w / sigma).to(w_orig.dtype)


def _head_keys(state_dict, prefix: str):
    heads = prefix + "classification_heads."
    return sorted({k[: k.rindex(".")] for k in state_dict if k.startswith(heads)
                   and k.rsplit(".", 1)[-1] in ("weight", "weight_orig")
                   and k[len(heads):].count(".") == 2})


def _alias_normalised_weights(state_dict, prefix: str):
    aliases = []
    for module_key in _head_keys(state_dict, prefix):
        if module_key + ".weight_orig" in state_dict and module_key + ".weight" not in state_dict:
            state_dict[module_key + ".weight"] = state_dict[module_key + ".weight_orig"]
            aliases.append(module_key + ".weight")
    return aliases


def _match_model_form(model, state_dict, prefix: str) -> None:
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
                logger.info("R4F: loading plain %s as weight_orig of a spectral-normalised layer", key)
                state_dict[key + "_orig"] = state_dict.pop(key)
                state_dict[key + "_u"] = linear.weight_u.detach().clone()
                state_dict[key + "_v"] = linear.weight_v.detach().clone()
            elif not is_spectral_normed(linear) and saved_normalised:
                logger.info("R4F: loading spectral-normalised %s into a plain layer (W / sigma)", key)
                state_dict[key] = _normalised_weight(*(state_dict.pop(key + s) for s in _SN_SUFFIXES))


def _spectral_norm_aware_upgrade(upgrade):
    @functools.wraps(upgrade)
    def wrapper(self, state_dict, name):
        prefix = name + "." if name != "" else ""
        aliases = _alias_normalised_weights(state_dict, prefix)
        upgrade(self, state_dict, name)
        for key in aliases:
            if key[: -len(".weight")] + ".weight_orig" in state_dict:
                state_dict.pop(key, None)
        _match_model_form(self, state_dict, prefix)

    wrapper._robustft_r4f = True
    return wrapper


def _register_head_with_dense_norm(register):
    @functools.wraps(register)
    def wrapper(self, name, *args, **kwargs):
        register(self, name, *args, **kwargs)
        if getattr(self.args, "r4f_spectral_norm_dense", False):
            require(getattr(self.args, "spectral_norm_classification_head", False),
                    "--r4f-spectral-norm-dense",
                    "normalises the head's dense layer on top of R4F; also pass "
                    "--spectral-norm-classification-head")
            head = self.classification_heads[name]
            if not is_spectral_normed(head.dense):
                head.dense = torch.nn.utils.spectral_norm(head.dense)

    wrapper._robustft_r4f = True
    return wrapper


def install() -> None:
    for cls in (RobertaModel, BARTModel):
        if not getattr(cls.upgrade_state_dict_named, "_robustft_r4f", False):
            cls.upgrade_state_dict_named = _spectral_norm_aware_upgrade(cls.upgrade_state_dict_named)
        if not getattr(cls.register_classification_head, "_robustft_r4f", False):
            cls.register_classification_head = _register_head_with_dense_norm(cls.register_classification_head)


install()
