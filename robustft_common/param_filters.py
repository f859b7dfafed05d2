"""Which parameters a parameter-noise method touches (PATS, SAGE, NoisyTune), and their names.

Selection is by parameter *name* (regexes over `model.named_parameters()` names), never by shape.

fairseq hands an optimizer bare tensors (`fairseq/trainer.py` `Trainer._build_optimizer` ->
`optim.build_optimizer(cfg.optimizer, params)`), and under `--fp16 --fp16-no-flatten-grads` those are
fresh fp32 copies (`FP16Optimizer.build_fp32_params`) that carry none of the model's attributes. The
least invasive way to recover names that covers every mode: `fairseq_patches.publish_trainer_param_names`
wraps `Trainer._build_optimizer` (behaviour unchanged) so that, while it runs, the names of the parameters it
passes — `chain(model, criterion)` filtered by `requires_grad`, the order fairseq itself uses and every
fp16 wrapper preserves — are published; an optimizer built inside picks them up with
`names_for_params(params)` (by position, checked against shapes of the same list). Outside a Trainer
(unit tests, scripts) pass names explicitly or tag a module with `tag_parameter_names`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from itertools import chain

import torch

# Every parameter inside an encoder layer: RoBERTa `encoder.sentence_encoder.layers.N.*`,
# BART/transformer `encoder.layers.N.*`.
ENCODER_LAYERS = r"(^|\.)encoder\.(.+\.)?layers\.\d+\."
# LayerNorm weights/biases: fairseq names them `*_layer_norm`, `layer_norm`, `layernorm_embedding`.
LAYER_NORM = r"(layer_?norm|(^|\.)ln(_\w+)?\.)"
# Tensors SAGE's code trains without weight decay (cliang1453/SAGE mt_dnn/model.py
# `_get_usadam_param_groups`: no_decay = bias, gamma, beta, LayerNorm.{bias,weight}), in fairseq's names:
# every bias and every LayerNorm tensor (`emb_layer_norm`, `layernorm_embedding`, `*_layer_norm`).
NO_DECAY = r"((^|\.)bias$|" + LAYER_NORM + ")"
ALL = r".*"
NOTHING = ""

NAME_ATTR = "_robustft_name"


def compile_pattern(flag: str, pattern: str) -> re.Pattern | None:
    """Empty pattern = matches nothing; a bad regex raises naming the flag."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{flag}: not a valid regular expression ({err}): {pattern!r}") from err


def select(names: Sequence[str], include: str, exclude: str, include_flag: str, exclude_flag: str) -> list[bool]:
    """Mask over `names`: matches `include` (re.search) and not `exclude`.

    A filter that selects nothing is a configuration error (a silent no-op method otherwise).
    """
    inc = compile_pattern(include_flag, include)
    exc = compile_pattern(exclude_flag, exclude)
    mask = [bool(inc is not None and inc.search(n)) and not (exc is not None and exc.search(n)) for n in names]
    if names and not any(mask):
        sample = ", ".join(list(names)[:6])
        raise ValueError(
            f"{include_flag} {include!r} (minus {exclude_flag} {exclude!r}) matches no parameter; "
            f"fix the regex. Parameter names look like: {sample}, ..."
        )
    return mask


def tag_parameter_names(*modules: torch.nn.Module, prefixes: Sequence[str] = ()) -> None:
    """Set `p._robustft_name` on every parameter (for optimizers built outside a Trainer)."""
    for i, module in enumerate(modules):
        prefix = prefixes[i] if i < len(prefixes) else ""
        for name, p in module.named_parameters():
            setattr(p, NAME_ATTR, prefix + name)


_pending_names: list[list[tuple]] = []  # stack of [(name, shape)] published by the Trainer hook


@contextlib.contextmanager
def publish_param_names(named_params: Iterable[tuple]):
    """Within the block, `names_for_params` resolves params positionally against `named_params`."""
    _pending_names.append([(n, tuple(p.shape)) for n, p in named_params])
    try:
        yield
    finally:
        _pending_names.pop()


def names_for_params(params: Sequence[torch.Tensor]) -> list[str] | None:
    """Names of `params` if they can be recovered, else None.

    Order of preference: `_robustft_name` tags on every tensor; else the list published by the
    Trainer hook when it has the same length and shapes (fp32 copies keep order and shape).
    """
    tags = [t for p in params if (t := getattr(p, NAME_ATTR, None)) is not None]
    if params and len(tags) == len(params):
        return tags
    if _pending_names:
        published = _pending_names[-1]
        if len(published) == len(params) and all(shape == tuple(p.shape) for (_, shape), p in zip(published, params)):
            return [n for n, _ in published]
    return None


def trainer_named_params(trainer) -> list[tuple]:
    """The (name, param) list in the exact order `Trainer._build_optimizer` collects params."""
    # unwrapped modules: same parameters in the same order as the (DDP-)wrapped ones, clean names
    model = trainer._model if getattr(trainer, "_model", None) is not None else trainer.model
    criterion = trainer._criterion if getattr(trainer, "_criterion", None) is not None else trainer.criterion
    return [
        (n, p)
        for n, p in chain(model.named_parameters(), (("criterion." + n, p) for n, p in criterion.named_parameters()))
        if p.requires_grad
    ]
