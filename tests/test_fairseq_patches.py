"""robustft_common/fairseq_patches.py: each patch's guard (fails when the fairseq code it relies on changes),
idempotent installation, and a run through the plugin that uses none of its components trains
bit-identically to stock fairseq."""

import argparse
import inspect
import re
from pathlib import Path

import pytest
import torch

import robustft  # noqa: F401  (installs the patches, as --user-dir does)
from robustft_common import fairseq_patches
from tests.fairseq_helpers import json_logs, make_sentence_prediction_data, run_tool, sentence_prediction_args


def _source(fn) -> str:
    """fairseq's own source of `fn` (under our wrapper, if any), whitespace-normalised."""
    return re.sub(r"\s+", " ", inspect.getsource(inspect.unwrap(fn)))


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(inspect.unwrap(fn)).parameters.values()]


# -- installation ----------------------------------------------------------------------------------
def _patched():
    from fairseq import checkpoint_utils, models
    from fairseq.file_io import PathManager
    from fairseq.models.bart.model import BARTModel
    from fairseq.models.roberta.model import RobertaModel
    from fairseq.trainer import Trainer

    return [
        checkpoint_utils.load_checkpoint_to_cpu,
        checkpoint_utils.torch_persistent_save,
        checkpoint_utils.load_checkpoint,
        PathManager.copy,
        Trainer.load_checkpoint,
        Trainer._build_optimizer,
        Trainer.set_num_updates,
        Trainer.state_dict,
        RobertaModel.upgrade_state_dict_named,
        BARTModel.upgrade_state_dict_named,
        RobertaModel.register_classification_head,
        BARTModel.register_classification_head,
        models.build_model,
    ]


def _layers(fn):
    """(number of wrappers around fairseq's function, fairseq's function)."""
    layers = 0
    while hasattr(fn, "__wrapped__"):
        fn, layers = fn.__wrapped__, layers + 1
    return layers, fn


def test_install_is_idempotent_and_wraps_fairseq_once():
    """Installing again adds no wrapper; under the wrappers (one per patch of that function) is fairseq's."""
    before = [_layers(fn)[0] for fn in _patched()]
    fairseq_patches.install()
    fairseq_patches.install()
    for fn, layers_before in zip(_patched(), before):
        assert getattr(fn, "_robustft_patch", False), fn
        layers, stock = _layers(fn)
        assert layers == layers_before >= 1 and stock.__module__.startswith("fairseq"), fn
    assert len(fairseq_patches._EXIT_HOOK) == 1


# -- guards: what each patch relies on in fairseq-fixed 0.12.3.1 ----------------------------------
def test_guard_model_loading_messages():
    """explain_model_loading: fairseq-train loads its checkpoint through the module attribute
    `checkpoint_utils.load_checkpoint(cfg, trainer, **passthrough_args)`, which returns (extra_state, epoch_itr);
    the trainer turns a model that does not fit into "Cannot load model parameters from checkpoint PATH; ..."
    and returns None when no file is found. Two patches of one function both apply (`_wrap`)."""
    from fairseq import checkpoint_utils, trainer
    from fairseq_cli import train

    from robustft_common import checkpoint_hints

    assert [p[0] for p in _params(checkpoint_utils.load_checkpoint)] == ["cfg", "trainer", "passthrough_args"]
    assert "extra_state, epoch_itr = checkpoint_utils.load_checkpoint( cfg.checkpoint, trainer," in _source(train.main)
    assert "return extra_state, epoch_itr" in _source(checkpoint_utils.load_checkpoint)
    load = _source(trainer.Trainer.load_checkpoint)
    assert '"Cannot load model parameters from checkpoint {}; " "please ensure that the architectures match."' in load
    assert 'logger.info("No existing checkpoint found {}".format(filename)) return extra_state' in load
    found = checkpoint_hints._FAILED.search(
        "Cannot load model parameters from checkpoint /a b/model.pt; please ensure that the architectures match."
    )
    assert found.group(1) == "/a b/model.pt"

    class Owner:
        @staticmethod
        def f(x):
            return [x]

    def first(original):
        return lambda x: original(x) + ["first"]

    def second(original):
        return lambda x: original(x) + ["second"]

    for _ in range(2):  # installing twice changes nothing
        fairseq_patches._wrap(Owner, "f", first)
        fairseq_patches._wrap(Owner, "f", second)
    assert Owner.f(0) == [0, "first", "second"]


def test_guard_checkpoints_are_loaded_with_torch_default_weights_only():
    """allow_checkpoint_globals: fairseq's torch.load calls pass no `weights_only`, so torch's safe loader
    and our allow-list apply (a `weights_only=False` in fairseq would silently make the list moot)."""
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    assert 'torch.load(f, map_location=torch.device("cpu"))' in _source(checkpoint_utils.load_checkpoint_to_cpu)
    assert 'torch.load(buffer, map_location="cpu")' in _source(distributed_utils._broadcast_object_slow)
    assert "_TensorPlaceholder(" in _source(distributed_utils._split_tensors_from_obj)
    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_guard_checkpoint_loads_go_through_the_module_attribute():
    """verify_checkpoints_on_load: replacing `checkpoint_utils.load_checkpoint_to_cpu` reaches every caller."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    assert _params(checkpoint_utils.load_checkpoint_to_cpu) == [
        ("path", inspect.Parameter.empty),
        ("arg_overrides", None),
        ("load_on_all_ranks", False),
    ]
    assert "checkpoint_utils.load_checkpoint_to_cpu(" in _source(Trainer.load_checkpoint)
    assert "load_checkpoint_to_cpu(filename, arg_overrides)" in _source(checkpoint_utils.load_model_ensemble_and_task)
    # nobody outside examples/ binds the function at import time (the wrapper would miss them)
    root = Path(checkpoint_utils.__file__).parent
    binders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "examples" not in p.parts
        and re.search(r"from fairseq\.checkpoint_utils import .*load_checkpoint_to_cpu", p.read_text())
    ]
    assert binders == []


def test_guard_eval_sites_are_the_audited_ones():
    """verify_checkpoints_on_load (checkpoint_config): every eval / eval_str_list / eval_str_dict / eval_bool call
    in fairseq (outside examples/) is one audited in checkpoint_config.EVAL_SITES, with the expression it
    evaluates; a new or changed site must be classified there before this passes."""
    import ast

    import fairseq

    from robustft_common.checkpoint_config import EVAL_SITES

    evaluators = {"eval", "eval_str_list", "eval_str_dict", "eval_bool"}
    root = Path(fairseq.__file__).parent.parent
    found = set()
    for package in ("fairseq", "fairseq_cli"):
        for path in sorted((root / package).rglob("*.py")):
            if "examples" in path.relative_to(root).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
                if name in evaluators and (isinstance(func, ast.Name) or owner in ("utils", "options")):
                    found.add((str(path.relative_to(root)), ast.unparse(node.args[0])))
    assert found == set(EVAL_SITES)
    assert len(found) > 50  # the scan sees fairseq's code


def test_guard_checkpoint_writes_and_copies():
    """atomic_checkpoint_writes: fairseq writes every checkpoint through `torch_persistent_save` (module
    attribute) and copies it onto the other names with `PathManager.copy(src, dst, overwrite=True)`, which
    truncates: what the wrappers replace for local files."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager
    from fairseq.trainer import Trainer

    assert _params(checkpoint_utils.torch_persistent_save) == [
        ("obj", inspect.Parameter.empty),
        ("filename", inspect.Parameter.empty),
        ("async_write", False),
    ]
    assert 'PathManager.rename(filename + ".tmp", filename)' in _source(checkpoint_utils.torch_persistent_save)
    assert "checkpoint_utils.torch_persistent_save( state_dict, filename," in _source(Trainer.save_checkpoint)
    save = _source(checkpoint_utils.save_checkpoint)
    assert "trainer.save_checkpoint(checkpoints[0], extra_state)" in save
    assert "PathManager.copy( checkpoints[0], cp, overwrite=True )" in save
    assert _params(PathManager.copy) == [
        ("src_path", inspect.Parameter.empty),
        ("dst_path", inspect.Parameter.empty),
        ("overwrite", False),
    ]
    assert "return shutil.copyfile(src_path, dst_path)" in _source(PathManager.copy)


def test_guard_resume_reads_checkpoint_last_through_trainer_load_checkpoint():
    """resume_from_intact_checkpoint: the resume file fairseq passes, and which ranks read it themselves
    (mirrored by fairseq_patches._reads_checkpoint_itself)."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    assert [p for p, _ in _params(Trainer.load_checkpoint)][:2] == ["self", "filename"]
    load = _source(checkpoint_utils.load_checkpoint)
    assert 'checkpoint_path = os.path.join( cfg.save_dir, "checkpoint_last{}.pt".format(suffix) )' in load
    assert "extra_state = trainer.load_checkpoint( checkpoint_path," in load
    assert (
        "load_on_all_ranks = ( self.cfg.checkpoint.load_checkpoint_on_all_dp_ranks # TPUs don't support broadcast "
        "yet, so load checkpoints # on every worker for now or self.tpu # FSDP requires loading checkpoint shards "
        "on all ranks or (self.is_fsdp and self.cfg.distributed_training.use_sharded_state) or "
        'getattr(self.cfg.model, "base_layers", 0) > 0 ) if load_on_all_ranks or self.data_parallel_rank == 0:'
    ) in _source(Trainer.load_checkpoint)


def test_guard_training_loop_for_preemption():
    """save_on_preemption: train.main loads its checkpoint before the loop; every update ends in
    validate_and_save (module global); save_checkpoint with val_loss None, no epoch and no interval
    checkpoint writes checkpoint_last alone."""
    import fairseq_cli.train as train
    from fairseq import checkpoint_utils

    main = _source(train.main)
    assert main.index("checkpoint_utils.load_checkpoint(") < main.index("train(cfg, trainer, task, epoch_itr)")
    assert (
        "end_of_epoch = not itr.has_next() valid_losses, should_stop = validate_and_save( cfg, trainer, task, "
        "epoch_itr, valid_subsets, end_of_epoch )"
    ) in _source(train.train)
    assert [p for p, _ in _params(train.validate_and_save)] == [
        "cfg",
        "trainer",
        "task",
        "epoch_itr",
        "valid_subsets",
        "end_of_epoch",
    ]
    assert _params(checkpoint_utils.load_checkpoint)[:2] == [
        ("cfg", inspect.Parameter.empty),
        ("trainer", inspect.Parameter.empty),
    ]
    save = _source(checkpoint_utils.save_checkpoint)
    for condition in (
        '"checkpoint{}{}.pt".format(epoch, suffix)] = ( end_of_epoch and not cfg.no_epoch_checkpoints',
        '"checkpoint_{}_{}{}.pt".format(epoch, updates, suffix)] = ( not end_of_epoch and '
        "cfg.save_interval_updates > 0",
        '"checkpoint_best{}.pt".format(suffix)] = val_loss is not None and',
        "if val_loss is not None and cfg.keep_best_checkpoints > 0:",
        '"checkpoint_last{}.pt".format(suffix) ] = not cfg.no_last_checkpoints',
    ):
        assert condition in save, condition


def test_guard_trainer_collects_optimizer_params_as_published():
    """publish_trainer_param_names: the names are published in the order `_build_optimizer` collects params."""
    from fairseq.trainer import Trainer

    src = _source(Trainer._build_optimizer)
    assert ("filter( lambda p: p.requires_grad, chain(self.model.parameters(), self.criterion.parameters()), )") in src
    assert "optim.build_optimizer(self.cfg.optimizer, params)" in src
    assert _params(Trainer._build_optimizer) == [("self", inspect.Parameter.empty)]
    assert fairseq_patches.building_trainer() is None  # published only while _build_optimizer runs


def test_guard_trainer_update_count_and_extra_state_for_criterions():
    """criterion_update_hooks: `Trainer.set_num_updates` runs after every optimizer step and once when a
    checkpoint is loaded, before `load_checkpoint(filename, reset_optimizer, ...)` returns its extra_state;
    `Trainer.state_dict` holds the extra_state dict that `save_checkpoint` saves."""
    from fairseq.trainer import Trainer

    assert _params(Trainer.set_num_updates) == [
        ("self", inspect.Parameter.empty),
        ("num_updates", inspect.Parameter.empty),
    ]
    assert "self.set_num_updates(self.get_num_updates() + 1)" in _source(Trainer.train_step)
    load = _source(Trainer.load_checkpoint)
    assert 'self.set_num_updates(last_optim["num_updates"])' in load and load.rstrip().endswith("return extra_state")
    assert [name for name, _ in _params(Trainer.load_checkpoint)][:3] == ["self", "filename", "reset_optimizer"]
    assert '"extra_state": { "metrics": metrics.state_dict(),' in _source(Trainer.state_dict)
    save = _source(Trainer.save_checkpoint)
    assert "state_dict = utils.move_to_cpu(self.state_dict())" in save
    assert 'state_dict["extra_state"].update(extra_state)' in save


@pytest.mark.parametrize("module", ["roberta", "bart"])
def test_guard_head_upgrade_and_registration(module):
    """reload_spectral_norm_heads / r4f_dense_spectral_norm: the signatures we wrap, the plain-name lookups
    that fail on normalised heads, and where fairseq puts the spectral norm."""
    if module == "roberta":
        from fairseq.models.roberta.model import RobertaClassificationHead as Head
        from fairseq.models.roberta.model import RobertaModel as Model
    else:
        from fairseq.models.bart.model import BARTClassificationHead as Head
        from fairseq.models.bart.model import BARTModel as Model

    assert _params(Model.upgrade_state_dict_named) == [
        ("self", inspect.Parameter.empty),
        ("state_dict", inspect.Parameter.empty),
        ("name", inspect.Parameter.empty),
    ]
    upgrade = _source(Model.upgrade_state_dict_named)
    assert '".out_proj.weight" ].size(0)' in upgrade and '".dense.weight" ].size(0)' in upgrade
    assert _params(Model.register_classification_head) == [
        ("self", inspect.Parameter.empty),
        ("name", inspect.Parameter.empty),
        ("num_classes", None),
        ("inner_dim", None),
        ("kwargs", inspect.Parameter.empty),
    ]
    assert "self.classification_heads[name] = " in _source(Model.register_classification_head)
    assert "self.dense = nn.Linear(input_dim, inner_dim)" in _source(Head.__init__)
    assert "self.out_proj = torch.nn.utils.spectral_norm(self.out_proj)" in _source(Head.__init__)
    # torch's spectral norm stores the names spectral_norm_heads converts
    linear = torch.nn.utils.spectral_norm(torch.nn.Linear(3, 2))
    assert {"weight_orig", "bias"} == {n for n, _ in linear.named_parameters()}
    assert {"weight_u", "weight_v"} == {n for n, _ in linear.named_buffers()}


def test_guard_head_is_registered_before_criterion_optimizer_and_checkpoint():
    """r4f_dense_spectral_norm: normalising at registration comes before the optimizer and checkpoint load."""
    import fairseq_cli.train as train
    from fairseq.tasks.sentence_prediction import SentencePredictionTask

    build = _source(SentencePredictionTask.build_model)
    assert build.index("models.build_model(cfg, self, from_checkpoint)") < build.index(
        "model.register_classification_head("
    )
    main = _source(train.main)
    order = [
        "task.build_model(cfg.model)",
        "task.build_criterion(cfg.criterion)",
        "Trainer(cfg, task, model, criterion, quantizer)",
        "checkpoint_utils.load_checkpoint(",
    ]
    positions = [main.index(s) for s in order]
    assert positions == sorted(positions)


def test_guard_models_are_built_through_the_module_attribute():
    """mixout_at_model_build: tasks reach `fairseq.models.build_model` through the module at call time (the
    wrapper sees every model), the training loop builds the model before casting it and loading a checkpoint,
    and MultiheadAttention reads the projections' `weight` attributes (parametrized by Mixout)."""
    from fairseq import models
    from fairseq.modules.multihead_attention import MultiheadAttention
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.tasks.sentence_prediction import SentencePredictionTask
    from fairseq.trainer import Trainer

    assert _params(models.build_model) == [
        ("cfg", inspect.Parameter.empty),
        ("task", inspect.Parameter.empty),
        ("from_checkpoint", False),
    ]
    for task in (FairseqTask, SentencePredictionTask):
        src = _source(task.build_model)
        assert "from fairseq import models" in src and "models.build_model(cfg, self, from_checkpoint)" in src
    init, load = _source(Trainer.__init__), _source(Trainer.load_checkpoint)
    assert "self._model = self._model.half()" in init
    assert 'self.model.load_state_dict( state["model"], strict=True, model_cfg=self.cfg.model )' in load
    forward = _source(MultiheadAttention.forward)
    assert "q_proj_weight=self.q_proj.weight," in forward and "self.out_proj.weight," in forward
    root = Path(models.__file__).parent.parent
    binders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "examples" not in p.parts and re.search(r"from fairseq\.models import .*\bbuild_model\b", p.read_text())
    ]
    assert binders == []


def test_guard_prefetch_thread_fields():
    """stop_prefetch_threads_at_exit: BackgroundConsumer's queue and length bound, and the loop that reads it."""
    from fairseq.data.iterators import BackgroundConsumer

    init, run = _source(BackgroundConsumer.__init__), _source(BackgroundConsumer.run)
    assert "self._queue = queue" in init and "self._max_len = max_len" in init
    assert "if self._max_len is not None and self.count >= self._max_len: break" in run
    assert "self._queue.put(item)" in run and "self._queue.put(_sentinel)" in run


# -- a run that uses none of the plugin's components ---------------------------------------------
TIMING = {"wps", "ups", "wpb_per_sec", "train_wall", "wall", "gb_free"}


def _without_user_dir(args):
    i = args.index("--user-dir")
    return args[:i] + args[i + 2 :]


def _train(args, save_dir: Path, strict: bool):
    """Run fairseq-train; returns its log records. Without the plugin fairseq may abort at exit (-6) while
    its prefetch thread collates (robustft_common/shutdown.py): accepted only after the run finished and
    wrote its last checkpoint, so what is compared below is complete."""
    proc = run_tool("fairseq-train", *args, check=strict)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        assert proc.returncode == -6, log[-3000:]
        assert "done training" in log and re.search(r"Saved checkpoint \S*checkpoint_last\.pt", log), log[-3000:]
    assert (save_dir / "checkpoint_last.pt").exists()
    return [
        {k: v for k, v in r.items() if not _is_timing(k)}
        for r in json_logs(log)
        if "loss" in r or "train_loss" in r or "valid_loss" in r
    ]


def _is_timing(key: str) -> bool:
    return key in TIMING or key.endswith(tuple("_" + t for t in TIMING))


def _tensors(state, prefix="") -> dict:
    """Every tensor in a nested checkpoint structure, by path."""
    if torch.is_tensor(state):
        return {prefix: state}
    if isinstance(state, dict):
        children = state.items()
    elif isinstance(state, (list, tuple)):
        children = enumerate(state)
    else:
        return {}
    out = {}
    for key, value in children:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


@pytest.mark.e2e
def test_stock_run_is_bit_identical_with_and_without_the_plugin(tmp_path):
    data = make_sentence_prediction_data(tmp_path / "data")
    plugin = sentence_prediction_args(data, tmp_path / "plugin", max_update=6)  # stock criterion + adam
    assert plugin[plugin.index("--criterion") + 1] == "sentence_prediction"
    assert plugin[plugin.index("--optimizer") + 1] == "adam"
    stock = _without_user_dir(sentence_prediction_args(data, tmp_path / "stock", max_update=6))
    assert "--user-dir" not in stock

    logs_plugin = _train(plugin, tmp_path / "plugin", strict=True)
    logs_stock = _train(stock, tmp_path / "stock", strict=False)
    assert len([r for r in logs_stock if "num_updates" in r and "loss" in r]) == 6
    assert logs_plugin == logs_stock  # every logged loss, accuracy, lr, gnorm, validation value

    a = torch.load(tmp_path / "plugin" / "checkpoint_last.pt")
    b = torch.load(tmp_path / "stock" / "checkpoint_last.pt")
    for part in ("model", "last_optimizer_state"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys() and len(ta) > 10
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (part, key)
