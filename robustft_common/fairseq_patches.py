"""Every change the plugin makes to fairseq's own behaviour, in one place; `install()` applies them once.

Written against, and tested with, fairseq-fixed 0.12.3.1 (file:line below refer to it; `compat.py` refuses
fairseq older than the 0.12 line). Each patch says what it changes and why; each has a guard in
tests/test_fairseq_patches.py that fails when the fairseq code it relies on changes.

A run through `--user-dir robustft` that uses none of the plugin's components trains bit-identically to the
same run without it (tested there): the patches only act when a checkpoint is refused, on spectral-normalised
classification heads (which stock fairseq cannot reload), on the model of a run with `--mixout-p`, around
optimizer construction (names published, nothing changed) and at process exit.
"""

from __future__ import annotations

import atexit
import functools
import pickle
import re

from robustft_common import compat, mixout, param_filters, shutdown, spectral_norm_heads

_MARK = "_robustft_patch"  # set on every wrapper
# the patches (their `make` functions) already in a wrapper chain: installing twice never wraps twice, and
# two patches of the same fairseq function both apply (one wrapping the other)
_APPLIED = "_robustft_patches"


def _wrap(owner, name: str, make_wrapper) -> None:
    """Replace `owner.name` by `make_wrapper(original)` unless this patch is already in place there
    (`__wrapped__` = original)."""
    original = getattr(owner, name)
    applied: frozenset[str] = getattr(original, _APPLIED, frozenset())
    if make_wrapper.__qualname__ in applied:
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    setattr(wrapper, _APPLIED, applied | {make_wrapper.__qualname__})
    setattr(owner, name, wrapper)


def allow_checkpoint_globals() -> None:
    """fairseq checkpoints load under torch's `weights_only=True` default (torch >= 2.6).

    fairseq loads checkpoints with a bare `torch.load(f, map_location=cpu)` (fairseq/checkpoint_utils.py:340)
    and unpickles the state rank 0 broadcasts the same way (fairseq/distributed/utils.py:805). torch >= 2.6
    then refuses what every fairseq checkpoint pickles (argparse.Namespace, omegaconf nodes, ...): stock
    fairseq cannot resume its own runs. We allow exactly those types (`compat.checkpoint_safe_globals`),
    never `weights_only=False`.
    """
    compat.register_checkpoint_safe_globals()


def explain_refused_checkpoints() -> None:
    """A refused checkpoint is reported with its path and safe advice.

    torch's refusal names no file and suggests `weights_only=False` or allow-listing the offending global:
    the two ways to run an untrusted file. fairseq's trainer and loaders call
    `checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False)`
    (fairseq/checkpoint_utils.py:306) through the module attribute (fairseq/trainer.py:495) or the module's
    globals (checkpoint_utils.py:450, 852), so replacing the attribute covers them.
    """
    from fairseq import checkpoint_utils

    def make(original):
        def load_checkpoint_to_cpu(path, *args, **kwargs):
            try:
                return original(path, *args, **kwargs)
            except pickle.UnpicklingError as err:
                raise pickle.UnpicklingError(refusal_message(path, err)) from None

        return load_checkpoint_to_cpu

    _wrap(checkpoint_utils, "load_checkpoint_to_cpu", make)


def refusal_message(path, err: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(err))
    what = found.group(1) if found else "an object torch's weights_only loader refuses"
    return (
        f"refusing to load checkpoint {path}: it pickles {what}, which is not part of a fairseq "
        f"checkpoint. robustft loads checkpoints with torch weights_only=True and the allow-list in "
        f"robustft_common/compat.py. If this is a genuine checkpoint of another fairseq version, report "
        f"that global so the list can be extended; do not disable weights_only or allow-list it for a "
        f"file you did not produce."
    )


def explain_model_loading() -> None:
    """A checkpoint that does not fit the model, or a converted model without its checkpoint, stops with the fix.

    fairseq-train loads --restore-file / --finetune-from-model / checkpoint_last.pt through
    `checkpoint_utils.load_checkpoint(cfg, trainer, **passthrough_args)` (fairseq/checkpoint_utils.py:208,
    called by fairseq_cli/train.py:165), which returns `(extra_state, epoch_itr)`. When the weights do not fit
    the model, `Trainer.load_checkpoint` replaces torch's list of mismatched tensors by "Cannot load model
    parameters from checkpoint PATH; please ensure that the architectures match." (fairseq/trainer.py:596-599);
    when no file is found it logs "No existing checkpoint found" and returns None (trainer.py:689-691). Here the
    first error becomes one naming both architectures and the flags that rebuild the checkpoint's (convert.json
    beside a converted checkpoint), and a model of `hf2fairseq` that got no checkpoint stops
    (`checkpoint_hints`). Other errors, a checkpoint that loads, and stock models without a checkpoint are
    untouched.
    """
    from fairseq import checkpoint_utils

    from robustft_common import checkpoint_hints

    def make(original):
        def load_checkpoint(cfg, trainer, **passthrough_args):
            try:
                extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
            except Exception as err:
                hint = checkpoint_hints.load_failure(err, trainer)
                if hint is None:
                    raise
                raise ValueError(hint) from None  # torch's wall of shapes is summarised in the hint
            checkpoint_hints.require_pretrained_weights(extra_state, cfg, trainer)
            return extra_state, epoch_itr

        return load_checkpoint

    _wrap(checkpoint_utils, "load_checkpoint", make)


def publish_trainer_param_names() -> None:
    """Optimizers built by the Trainer can learn the names of the tensors they get (behaviour unchanged).

    `Trainer._build_optimizer` (fairseq/trainer.py:289-310) hands the optimizer bare tensors,
    `chain(model.parameters(), criterion.parameters())` filtered by `requires_grad`, and under `--fp16`
    fresh fp32 copies without attributes; PATS/SAGE/NoisyTune select tensors by name. While the original
    runs, the names of that same list are published (`param_filters.publish_param_names`).
    """
    from fairseq.trainer import Trainer

    def make(original):
        def _build_optimizer(self):
            with param_filters.publish_param_names(param_filters.trainer_named_params(self)):
                return original(self)

        return _build_optimizer

    _wrap(Trainer, "_build_optimizer", make)


def reload_spectral_norm_heads() -> None:
    """Checkpoints with spectral-normalised classification heads reload (stock fairseq: KeyError).

    RobertaModel / BARTModel `upgrade_state_dict_named(self, state_dict, name)` (fairseq/models/roberta/
    model.py:382, bart/model.py:165) read `...out_proj.weight` to size each head (roberta :414-416, bart
    :182-184), which `--spectral-norm-classification-head` (a stock fairseq flag) stores as
    `out_proj.weight_orig/_u/_v`: resume, `--restore-file` and `from_pretrained` fail. See
    `spectral_norm_heads` for the conversion; heads without spectral norm are untouched.
    """
    from fairseq.models.bart.model import BARTModel
    from fairseq.models.roberta.model import RobertaModel

    def make(original):
        def upgrade_state_dict_named(self, state_dict, name):
            prefix = name + "." if name != "" else ""
            aliases = spectral_norm_heads.alias_normalised_weights(state_dict, prefix)
            original(self, state_dict, name)
            spectral_norm_heads.remove_aliases(state_dict, aliases)
            spectral_norm_heads.match_model_form(self, state_dict, prefix)

        return upgrade_state_dict_named

    for cls in (RobertaModel, BARTModel):
        _wrap(cls, "upgrade_state_dict_named", make)


def r4f_dense_spectral_norm() -> None:
    """`--r4f-spectral-norm-dense` (sentence_prediction_r3f) also spectral-normalises the head's `dense`.

    fairseq normalises `out_proj` only (fairseq/models/roberta/model.py:519-524). The head is normalised
    when it is registered (`register_classification_head(self, name, num_classes=None, inner_dim=None,
    **kwargs)`, roberta :329, bart :139), which `SentencePredictionTask.build_model` does right after
    building the model (fairseq/tasks/sentence_prediction.py:281-286): before the criterion exists
    (fairseq_cli/train.py:96-97), before a checkpoint is loaded into the model (trainer.py:585) and before
    the optimizer collects the parameters (trainer.py:289). So the optimizer and the checkpoints see the
    normalised parameters in both a fresh and a resumed run. Without the flag: stock behaviour.
    """
    from fairseq.models.bart.model import BARTModel
    from fairseq.models.roberta.model import RobertaModel

    def make(original):
        def register_classification_head(self, name, *args, **kwargs):
            original(self, name, *args, **kwargs)
            if spectral_norm_heads.dense_norm_requested(self.args):
                spectral_norm_heads.normalise_dense(self.args, self.classification_heads[name])

        return register_classification_head

    for cls in (RobertaModel, BARTModel):
        _wrap(cls, "register_classification_head", make)


def mixout_at_model_build() -> None:
    """`--mixout-p` (a flag of the plugin's sentence-prediction criterions) installs Mixout on the model
    `fairseq.models.build_model(cfg, task, from_checkpoint=False)` (fairseq/models/__init__.py:56) returns.

    Tasks call it through the module attribute (`from fairseq import models; models.build_model(...)`,
    fairseq/tasks/fairseq_task.py:353-355, sentence_prediction.py:276-281), before the criterion exists
    (fairseq_cli/train.py:96-97), before the Trainer casts the model (trainer.py:100-103) and before a
    checkpoint is loaded into it (trainer.py:585): the mixing targets are buffers the checkpoint fills
    (`mixout.py`). Without the flag: stock behaviour.
    """
    from fairseq import models

    def make(original):
        def build_model(cfg, *args, **kwargs):
            model = original(cfg, *args, **kwargs)
            mixout.install_from_model_args(model, cfg)
            return model

        return build_model

    _wrap(models, "build_model", make)


_EXIT_HOOK: list = []


def stop_prefetch_threads_at_exit() -> None:
    """A finished run exits 0 instead of SIGABRT (-6) when fairseq's prefetch thread is still collating.

    fairseq's `BackgroundConsumer` (fairseq/data/iterators.py:661-688) is a daemon thread filling
    `self._queue` until `self.count >= self._max_len`; CPython 3.11 kills it inside torch's C++ code at
    interpreter shutdown. At exit we ask it to stop after its current batch (`shutdown.py`).
    """
    if not _EXIT_HOOK:
        atexit.register(shutdown.stop_prefetch_threads)
        _EXIT_HOOK.append(shutdown.stop_prefetch_threads)


PATCHES = (
    allow_checkpoint_globals,
    explain_refused_checkpoints,
    explain_model_loading,
    publish_trainer_param_names,
    reload_spectral_norm_heads,
    r4f_dense_spectral_norm,
    mixout_at_model_build,
    stop_prefetch_threads_at_exit,
)


def install() -> None:
    """Apply every patch (idempotent: each checks whether it is already in place)."""
    for patch in PATCHES:
        patch()
