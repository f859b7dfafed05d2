"""Untrusted checkpoints: with the plugin imported, fairseq loads checkpoints through torch's
`weights_only=True` unpickler plus robustft_common/compat.py's allow-list, so a checkpoint that pickles
an arbitrary callable or class is refused and its payload never runs; a genuine checkpoint still loads.
"""

import os
import pickle
import subprocess
import sys

import pytest
import torch

import robustft  # noqa: F401  (registers the safe globals, as --user-dir does in fairseq-train)
from tests.fairseq_helpers import BIN, REPO, sentence_prediction_args
from tests.test_distributed import make_sp_data


class Payload:
    """An arbitrary object of a class no checkpoint needs."""

    def __init__(self):
        self.secret = 42


class RunsCommand:
    """Unpickling this calls os.system(command): the classic malicious-pickle payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A genuine fairseq checkpoint of the tiny model and two tampered copies of it."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    tmp = tmp_path_factory.mktemp("untrusted")
    data = make_sp_data(tmp)
    argv = [str(a) for a in sentence_prediction_args(data, tmp / "ckpt")]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    genuine = tmp / "genuine.pt"
    trainer.lr_step(0)  # builds the optimizer, as fairseq-train does before its first save
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(str(genuine), {})

    state = torch.load(genuine, weights_only=False)  # our own file: trusted
    marker = tmp / "payload_ran"
    tampered = {}
    for name, payload in (("command", RunsCommand(f"touch {marker}")), ("object", Payload())):
        evil = dict(state, extra_state={"hidden": payload})
        tampered[name] = tmp / f"{name}.pt"
        torch.save(evil, tampered[name])
    return {"data": data, "tmp": tmp, "genuine": genuine, "marker": marker, **tampered}


def test_genuine_checkpoint_loads_under_weights_only(checkpoints):
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints["genuine"]))
    assert "classification_heads.sentence_classification_head.out_proj.weight" in state["model"]


@pytest.mark.parametrize("kind,global_name", [("command", "posix.system"), ("object", "Payload")])
def test_load_checkpoint_to_cpu_refuses_pickled_objects(checkpoints, kind, global_name):
    from fairseq import checkpoint_utils

    with pytest.raises(pickle.UnpicklingError) as info:
        checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints[kind]))
    message = str(info.value)
    assert "refusing to load checkpoint" in message and global_name in message
    assert not checkpoints["marker"].exists()


@pytest.mark.e2e
def test_fairseq_train_restore_file_refuses_and_payload_never_runs(checkpoints):
    argv = sentence_prediction_args(
        checkpoints["data"],
        checkpoints["tmp"] / "restore",
        "--restore-file",
        checkpoints["command"],
        "--reset-optimizer",
        "--reset-dataloader",
        "--reset-meters",
    )
    proc = subprocess.run(
        [str(BIN / "fairseq-train"), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": str(BIN)},
    )
    assert proc.returncode != 0
    assert "UnpicklingError" in proc.stderr and "posix.system" in proc.stderr
    assert "num_updates" not in proc.stdout + proc.stderr
    assert not checkpoints["marker"].exists()


@pytest.mark.e2e
def test_control_the_payload_is_real_without_weights_only(checkpoints):
    """Negative control: with torch's documented opt-out the same file executes its payload, so the
    refusals above are what stops it (never set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for foreign files)."""
    code = (
        "import robustft; from fairseq import checkpoint_utils; "
        f"checkpoint_utils.load_checkpoint_to_cpu({str(checkpoints['command'])!r})"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1"),
    )
    assert checkpoints["marker"].exists()
    checkpoints["marker"].unlink()


def test_refusal_names_the_file_and_does_not_advise_allowlisting(checkpoints):
    from fairseq import checkpoint_utils

    path = str(checkpoints["object"])
    with pytest.raises(pickle.UnpicklingError) as info:
        checkpoint_utils.load_checkpoint_to_cpu(path)
    message = str(info.value)
    assert path in message and "add_safe_globals" not in message
