"""Every change the plugin makes to fairseq's own behaviour, in one place; `install()` applies them once.

Written against, and tested with, fairseq-fixed 0.12.3.1 (file:line below refer to it; `compat.py` refuses
fairseq older than the 0.12 line). Each patch says what it changes and why; each has a guard in
tests/test_fairseq_patches.py that fails when the fairseq code it relies on changes.

A run through `--user-dir robustft` that uses none of the plugin's components trains bit-identically to the
same run without it (tested there): the patches only act when a checkpoint is loaded (verified, refused when
unsafe or damaged), written (atomically, the same bytes, plus a checksum file) or resumed from a damaged
checkpoint_last, on a preemption signal, on spectral-normalised classification heads (which stock fairseq
cannot reload), on the model of a run with `--mixout-p`, around optimizer construction (names published,
nothing changed) and at process exit.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys

from robustft_common import (
    checkpoint_config,
    checkpoint_files,
    compat,
    mixout,
    param_filters,
    preemption,
    shutdown,
    spectral_norm_heads,
)

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
    static = isinstance(inspect.getattr_static(owner, name), staticmethod)  # fairseq's PathManager methods
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def allow_checkpoint_globals() -> None:
    """fairseq checkpoints load under torch's `weights_only=True` default (torch >= 2.6).

    fairseq loads checkpoints with a bare `torch.load(f, map_location=cpu)` (fairseq/checkpoint_utils.py:340)
    and unpickles the state rank 0 broadcasts the same way (fairseq/distributed/utils.py:805). torch >= 2.6
    then refuses what every fairseq checkpoint pickles (argparse.Namespace, omegaconf nodes, ...): stock
    fairseq cannot resume its own runs. We allow exactly those types (`compat.checkpoint_safe_globals`),
    never `weights_only=False`.
    """
    compat.register_checkpoint_safe_globals()


def verify_checkpoints_on_load() -> None:
    """Every checkpoint fairseq loads is verified, and refused when it could run code, naming the file.

    fairseq's trainer and loaders call `checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=None,
    load_on_all_ranks=False)` (fairseq/checkpoint_utils.py:306) through the module attribute (trainer.py:495)
    or the module's globals (checkpoint_utils.py:450, 852): train resume / --restore-file /
    --finetune-from-model, fairseq-validate / -generate / -interactive (load_model_ensemble),
    `from_pretrained` (hub_utils.py:70 -> load_model_ensemble_and_task) and the plugin's scripts. In order:
    1. the file must be intact (`checkpoint_files.verify`: SHA-256 against its checksum file, else the CRC-32
       of torch's zip members), else CheckpointDamagedError;
    2. torch.load under weights_only (`allow_checkpoint_globals`); a refused pickled global becomes
       CheckpointRefusedError (torch's own text advises weights_only=False or allow-listing the global: the two
       ways to run an untrusted file), any other unpickling failure CheckpointDamagedError with torch's
       reason. Nothing in load_checkpoint_to_cpu after torch.load (arg_overrides, `_upgrade_state_dict`,
       `convert_namespace_to_omegaconf`) evaluates config strings: they use ast.literal_eval only
       (dataclass/utils.py:249);
    3. the loaded `cfg`/`args` must hold literals where fairseq calls eval() (`checkpoint_config`), else
       CheckpointRefusedError naming the field, before anything builds a model from it.
    Other errors get a note naming the file.
    """
    from fairseq import checkpoint_utils

    def make(original):
        def load_checkpoint_to_cpu(path, *args, **kwargs):
            if os.path.isfile(path):  # remote (PathManager) paths: no local file to verify
                checkpoint_files.verify(path)
            try:
                state = original(path, *args, **kwargs)
            except Exception as err:
                if checkpoint_files.is_load_failure(err):
                    raise checkpoint_files.load_error(path, err) from None
                err.add_note(f"while loading checkpoint {path}")
                raise
            checkpoint_config.refuse_evaluated_values(state, path)
            return state

        return load_checkpoint_to_cpu

    _wrap(checkpoint_utils, "load_checkpoint_to_cpu", make)


def atomic_checkpoint_writes() -> None:
    """Checkpoints are written and copied atomically, with a SHA-256 checksum file beside each.

    fairseq saves through `checkpoint_utils.torch_persistent_save(obj, filename, async_write=False)`
    (checkpoint_utils.py:578-591: a temp file renamed into place, called by trainer.py:456), then copies the
    first file onto the others (checkpoint_last / checkpoint_best ...) with `PathManager.copy(src, dst,
    overwrite=True)` (checkpoint_utils.py:139-141), which for local files is `shutil.copyfile`
    (file_io.py:71-76): it truncates the destination first, so a full disk or a kill during the copy left a
    truncated checkpoint_last.pt. Local writes now go through `checkpoint_files.save_atomically` (temp file,
    fsync, rename, checksum file) and local copies of `*.pt` files through `checkpoint_files.copy_atomically`;
    async writes, other files (audio_pretraining.py:246 copies a dictionary) and remote (PathManager) paths
    keep fairseq's behaviour, without checksum files. The bytes written are torch.save's, unchanged.
    """
    import torch
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    def make_save(original):
        def torch_persistent_save(obj, filename, async_write: bool = False):
            if async_write or not _is_local(filename):
                return original(obj, filename, async_write)
            checkpoint_files.save_atomically(filename, lambda f: torch.save(obj, f))

        return torch_persistent_save

    def make_copy(original):
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            checkpoint = str(dst_path).endswith(".pt") and _is_local(src_path) and _is_local(dst_path)
            if not checkpoint or (os.path.exists(dst_path) and not overwrite):
                return original(src_path, dst_path, overwrite)
            checkpoint_files.copy_atomically(src_path, dst_path)
            return True

        return copy

    _wrap(checkpoint_utils, "torch_persistent_save", make_save)
    _wrap(PathManager, "copy", make_copy)


def _is_local(path) -> bool:
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(str(path))


def resume_from_intact_checkpoint() -> None:
    """A run resuming from a damaged checkpoint_last.pt resumes from the newest intact checkpoint instead.

    `checkpoint_utils.load_checkpoint` (checkpoint_utils.py:208-276, called once by fairseq_cli/train.py:165
    before the first update) hands `Trainer.load_checkpoint(self, filename, reset_optimizer=False,
    reset_lr_scheduler=False, optimizer_overrides=None, reset_meters=False)` (trainer.py:465) the save dir's
    checkpoint_last{suffix}.pt. When that is the file and it exists: the temp files a killed save left in the
    save dir are removed (on the rank that writes checkpoints), and if the file fails `checkpoint_files.verify`
    the newest intact checkpoint of the save dir is loaded instead, with a warning naming both (on every rank
    that reads the file itself, trainer.py:484-491; the others receive rank 0's state). Any other file
    (--restore-file, --finetune-from-model) is loaded as given: a damaged one is an error naming it.
    """
    from fairseq.trainer import Trainer

    def make(original):
        def load_checkpoint(self, filename, *args, **kwargs):
            last = os.path.join(self.cfg.checkpoint.save_dir, f"checkpoint_last{self.checkpoint_suffix}.pt")
            if os.path.isfile(filename) and os.path.abspath(filename) == os.path.abspath(last):
                if self.should_save_checkpoint_on_current_rank:
                    checkpoint_files.remove_stale_temps(self.cfg.checkpoint.save_dir)
                if _reads_checkpoint_itself(self):
                    filename = str(checkpoint_files.intact_or_newest_intact(filename, self.checkpoint_suffix))
            return original(self, filename, *args, **kwargs)

        return load_checkpoint

    _wrap(Trainer, "load_checkpoint", make)


def _reads_checkpoint_itself(trainer) -> bool:
    """Whether this rank reads the checkpoint file (trainer.py:484-494) rather than receive rank 0's copy."""
    return (
        trainer.data_parallel_rank == 0
        or trainer.cfg.checkpoint.load_checkpoint_on_all_dp_ranks
        or trainer.tpu
        or (trainer.is_fsdp and trainer.cfg.distributed_training.use_sharded_state)
        or getattr(trainer.cfg.model, "base_layers", 0) > 0
    )


def save_on_preemption() -> None:
    """SIGTERM / SIGUSR1 during training: checkpoint_last.pt at the next update boundary, exit code 75.

    fairseq_cli/train.py:main loads its checkpoint through `checkpoint_utils.load_checkpoint(cfg, trainer,
    **passthrough_args)` (train.py:165) right before its loop; from then on the signals are caught
    (`preemption.start`). The loop calls `validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets,
    end_of_epoch)` through the module's globals after every update (train.py:345, defined :375), on every
    rank; after fairseq's own validation/save there, the ranks agree on a pending signal and save and exit
    (`preemption`). fairseq_cli.train is wrapped when the first run loads its checkpoint, not at import:
    importing it configures the root logger (train.py:18-23), which a library import must not do.
    """
    from fairseq import checkpoint_utils

    def make_loop(original):
        def validate_and_save(cfg, trainer, task, epoch_itr, *args, **kwargs):
            valid_losses, should_stop = original(cfg, trainer, task, epoch_itr, *args, **kwargs)
            if preemption.requested_by_any_rank(trainer) and not should_stop:
                preemption.save_and_exit(cfg, trainer, epoch_itr)
            return valid_losses, should_stop

        return validate_and_save

    def make(original):
        def load_checkpoint(cfg, trainer, **passthrough_args):
            train_loop = sys.modules.get("fairseq_cli.train")
            if train_loop is not None:
                _wrap(train_loop, "validate_and_save", make_loop)
                preemption.start()
            return original(cfg, trainer, **passthrough_args)

        return load_checkpoint

    _wrap(checkpoint_utils, "load_checkpoint", make)


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


_BUILDING_TRAINERS: list = []  # the Trainers whose _build_optimizer is running (innermost last)


def building_trainer():
    """The fairseq Trainer that is building the optimizer right now (None outside `_build_optimizer`):
    ChildTuning-D's optimizer keeps it for its Fisher pass over the training data."""
    return _BUILDING_TRAINERS[-1] if _BUILDING_TRAINERS else None


def publish_trainer_param_names() -> None:
    """Optimizers built by the Trainer can learn the names of the tensors they get, and the Trainer
    (`building_trainer`) (behaviour unchanged).

    `Trainer._build_optimizer` (fairseq/trainer.py:289-310) hands the optimizer bare tensors,
    `chain(model.parameters(), criterion.parameters())` filtered by `requires_grad`, and under `--fp16`
    fresh fp32 copies without attributes; PATS/SAGE/NoisyTune/ChildTuning select tensors by name. While the
    original runs, the names of that same list are published (`param_filters.publish_param_names`). Before it,
    the optimizer class may refuse the configuration (`_check_optimizer_config`).
    """
    from fairseq.trainer import Trainer

    def make(original):
        def _build_optimizer(self):
            _check_optimizer_config(self.cfg)
            _BUILDING_TRAINERS.append(self)
            try:
                with param_filters.publish_param_names(param_filters.trainer_named_params(self)):
                    return original(self)
            finally:
                _BUILDING_TRAINERS.pop()

        return _build_optimizer

    _wrap(Trainer, "_build_optimizer", make)


def _check_optimizer_config(cfg) -> None:
    """An optimizer of the plugin may refuse the run's configuration (`check_trainer_config(cfg)`) before
    `Trainer._build_optimizer` builds fairseq's fp16 wrapper around it (trainer.py:320-345)."""
    from fairseq.optim import OPTIMIZER_REGISTRY

    check = getattr(OPTIMIZER_REGISTRY.get(getattr(cfg.optimizer, "_name", None)), "check_trainer_config", None)
    if check is not None:
        check(cfg)


CRITERION_STATE_KEY = "robustft_criterion"  # the checkpoint's extra_state entry of criterion_update_hooks


def criterion_update_hooks() -> None:
    """Criterions can act after every optimizer update and keep state in checkpoints (SMART's Bregman
    teacher; R4F's scaled-steps ablation, which rescales the head's step and saves the scales); a criterion
    without the hook methods below changes nothing.

    fairseq tells a criterion nothing about updates, and saves its state only when it has parameters
    (fairseq/trainer.py:410-414), which also makes the Trainer wrap it in DDP (trainer.py:241; torch's DDP refuses
    a module without trainable parameters). A criterion that defines
    - `robustft_after_update(model, num_updates)` is called by `Trainer.set_num_updates` (trainer.py:1275-1281),
      which runs after every optimizer step (trainer.py:1040) and once when a checkpoint is loaded (trainer.py:632,
      before the state below is restored), with the unwrapped model;
    - `robustft_state_dict()` / `robustft_load_state_dict(state)` gets that state saved in the checkpoint's
      `extra_state` (built by `Trainer.state_dict`, trainer.py:400-447, which `save_checkpoint` saves) and restored when
      `Trainer.load_checkpoint` (trainer.py:465-690) returns it, unless --reset-optimizer (it is training state,
      like the optimizer's). Rank 0's copy reaches the other ranks inside the broadcast checkpoint.
    - `robustft_after_checkpoint_load(model, num_updates)` is called when `Trainer.load_checkpoint` returns,
      whether or not a checkpoint was found: fairseq_cli/train.py:165 loads once before the first update, so
      num_updates 0 means training starts here (a fresh run, --restore-file / --finetune-from-model with the
      optimizer reset), and the optimizer is not built yet (trainer.py:604-606 builds it only to restore its
      state; else at the first access, trainer.py:278-286). R4F's init-only ablation rescales its head here.
    """
    from fairseq.trainer import Trainer

    def make_set_num_updates(original):
        def set_num_updates(self, num_updates):
            original(self, num_updates)
            hook = getattr(self.get_criterion(), "robustft_after_update", None)
            if hook is not None:
                hook(self.get_model(), num_updates)

        return set_num_updates

    def make_state_dict(original):
        def state_dict(self):
            state = original(self)
            criterion_state = getattr(self.get_criterion(), "robustft_state_dict", None)
            if criterion_state is not None:
                state["extra_state"][CRITERION_STATE_KEY] = criterion_state()
            return state

        return state_dict

    def make_load_checkpoint(original):
        def load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
            extra_state = original(self, filename, reset_optimizer, *args, **kwargs)
            load = getattr(self.get_criterion(), "robustft_load_state_dict", None)
            if load is not None and not reset_optimizer and extra_state and CRITERION_STATE_KEY in extra_state:
                load(extra_state[CRITERION_STATE_KEY])
            loaded = getattr(self.get_criterion(), "robustft_after_checkpoint_load", None)
            if loaded is not None:
                loaded(self.get_model(), self.get_num_updates())
            return extra_state

        return load_checkpoint

    _wrap(Trainer, "set_num_updates", make_set_num_updates)
    _wrap(Trainer, "state_dict", make_state_dict)
    _wrap(Trainer, "load_checkpoint", make_load_checkpoint)


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
    normalised parameters in both a fresh and a resumed run. `--r4f-spectral-norm-init-only` (an ablation)
    then replaces the normalised matrices by plain ones at the same point (its criterion divides them by
    sigma when training starts). Without the flags: stock behaviour.
    """
    from fairseq.models.bart.model import BARTModel
    from fairseq.models.roberta.model import RobertaModel

    def make(original):
        def register_classification_head(self, name, *args, **kwargs):
            original(self, name, *args, **kwargs)
            if spectral_norm_heads.dense_norm_requested(self.args):
                spectral_norm_heads.normalise_dense(self.args, self.classification_heads[name])
            if spectral_norm_heads.init_only_requested(self.args):
                spectral_norm_heads.plain_for_init_only(self.args, self.classification_heads[name])

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
    verify_checkpoints_on_load,
    atomic_checkpoint_writes,
    resume_from_intact_checkpoint,
    save_on_preemption,
    explain_model_loading,
    publish_trainer_param_names,
    criterion_update_hooks,
    reload_spectral_norm_heads,
    r4f_dense_spectral_norm,
    mixout_at_model_build,
    stop_prefetch_threads_at_exit,
)


def install() -> None:
    """Apply every patch (idempotent: each checks whether it is already in place)."""
    for patch in PATCHES:
        patch()
