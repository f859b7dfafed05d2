"""Untrusted checkpoints: with the plugin imported, fairseq loads checkpoints through torch's
`weights_only=True` unpickler plus robustft_common/compat.py's allow-list, so a checkpoint that pickles
an arbitrary callable or class is refused and its payload never runs; a genuine checkpoint still loads.
A checkpoint whose config holds code where fairseq calls eval() (robustft_common/checkpoint_config.py) is
refused too, naming the file and the field, at every entry point that loads checkpoints: fairseq-train
resume, fairseq-validate, fairseq-generate, `from_pretrained`, scripts/pats_sensitivity.py and
scripts/hyperdecoder_eval.py (the CLIs and scripts run in one process: `python -m
tests.test_untrusted_checkpoint ENTRIES.json`, like tests/test_distributed.py's launcher).
"""

import copy
import json
import os
import pickle
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import robustft  # noqa: F401  (registers the safe globals, as --user-dir does in fairseq-train)
from robustft_common.checkpoint_files import CheckpointRefusedError
from tests.fairseq_helpers import BIN, REPO, sentence_prediction_args


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
def checkpoints(sp_data, genuine_checkpoint, tmp_path_factory):
    """A genuine fairseq checkpoint of the tiny model (conftest) and tampered copies of it: two with a pickled
    payload, two whose config holds code in a field fairseq passes to eval() (nothing executable pickled)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    data, genuine = sp_data, genuine_checkpoint

    state = torch.load(genuine, weights_only=False)  # our own file: trusted
    marker = tmp / "payload_ran"
    tampered = {}
    for name, payload in (("command", RunsCommand(f"touch {marker}")), ("object", Payload())):
        evil = dict(state, extra_state={"hidden": payload})
        tampered[name] = tmp / f"{name}.pt"
        torch.save(evil, tampered[name])
    code = f"__import__('os').system('touch {marker}') or None"
    for name, (section, field) in CONFIG_PAYLOADS.items():
        evil = copy.deepcopy(state)
        node = evil["cfg"][section]
        if isinstance(node, dict):
            node[field] = code
        else:  # argparse.Namespace
            setattr(node, field, code)
        tampered[name] = tmp / f"{name}.pt"
        torch.save(evil, tampered[name])
    return {"data": data, "tmp": tmp, "genuine": genuine, "marker": marker, **tampered}


# where the config payloads sit: cfg.model is the legacy RoBERTa's argparse Namespace (the reported case,
# evaluated by MultiheadAttention), cfg.optimizer a plain dict (evaluated by fairseq's Adam)
CONFIG_PAYLOADS = {
    "config_model": ("model", "encoder_xformers_att_config"),
    "config_optimizer": ("optimizer", "adam_betas"),
}


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
    assert "CheckpointRefusedError: refusing to load checkpoint" in proc.stderr and "posix.system" in proc.stderr
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


# -- config values fairseq evaluates --------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONFIG_PAYLOADS))
def test_config_payload_is_refused_naming_file_and_field(checkpoints, kind):
    from fairseq import checkpoint_utils

    path = str(checkpoints[kind])
    with pytest.raises(CheckpointRefusedError) as info:
        checkpoint_utils.load_checkpoint_to_cpu(path)
    section, field = CONFIG_PAYLOADS[kind]
    assert f"refusing to load checkpoint {path}: cfg.{section}.{field} = " in str(info.value)
    assert not checkpoints["marker"].exists()


def test_model_loading_and_hub_refuse_the_config_payload(checkpoints):
    """load_model_ensemble_and_task (fairseq-validate / -generate / -interactive, pats_sensitivity.py) and
    the hub's from_pretrained build the model from the checkpoint's cfg: refused before that."""
    from fairseq import checkpoint_utils
    from fairseq.models.roberta import RobertaModel

    path = checkpoints["config_model"]
    with pytest.raises(CheckpointRefusedError, match="encoder_xformers_att_config"):
        checkpoint_utils.load_model_ensemble_and_task([str(path)])
    with pytest.raises(CheckpointRefusedError, match=f"{path}: cfg.model.encoder_xformers_att_config"):
        RobertaModel.from_pretrained(str(path.parent), path.name, str(checkpoints["data"]), bpe=None)
    assert not checkpoints["marker"].exists()
    hub = RobertaModel.from_pretrained(
        str(checkpoints["genuine"].parent), "checkpoint_last.pt", str(checkpoints["data"]), bpe=None
    )
    assert "sentence_classification_head" in hub.model.classification_heads  # the genuine file loads


def test_control_fairseq_runs_the_config_payload_when_building_the_model(checkpoints, monkeypatch):
    """Negative control: with fairseq's own loader the same file runs its payload while the model is built,
    so the refusals above are what stops it."""
    from fairseq import checkpoint_utils

    monkeypatch.setattr(checkpoint_utils, "load_checkpoint_to_cpu", checkpoint_utils.load_checkpoint_to_cpu.__wrapped__)
    checkpoint_utils.load_model_ensemble_and_task([str(checkpoints["config_model"])])
    assert checkpoints["marker"].exists()
    checkpoints["marker"].unlink()


def _entry_points(checkpoints):
    """Every way the plugin's users load a checkpoint, each given the config payload."""
    tmp, data, payload = checkpoints["tmp"], str(checkpoints["data"]), str(checkpoints["config_model"])
    resume = tmp / "resume"
    resume.mkdir(exist_ok=True)
    (resume / "checkpoint_last.pt").write_bytes(Path(payload).read_bytes())
    # the tiny task's flags on the command line, as a user of these tools gives them
    task = ["--user-dir", str(REPO / "robustft"), "--cpu", "--task", "sentence_prediction", "--num-classes", "2"]
    task += ["--criterion", "sentence_prediction"]
    return [
        ("fairseq-train (resume)", "fairseq_cli.train", [str(a) for a in sentence_prediction_args(data, resume)]),
        ("fairseq-validate", "fairseq_cli.validate", [data, *task, "--path", payload, "--batch-size", "8"]),
        ("fairseq-generate", "fairseq_cli.generate", [data, *task, "--path", payload, "--gen-subset", "valid"]),
        ("pats_sensitivity.py", "scripts/pats_sensitivity.py", [payload, "--out", str(tmp / "sens")]),
        ("hyperdecoder_eval.py", "scripts/hyperdecoder_eval.py", [payload, data, "--cpu"]),
    ]


@pytest.mark.e2e
def test_every_entry_point_refuses_the_config_payload(checkpoints):
    entries = _entry_points(checkpoints)
    jobs = checkpoints["tmp"] / "entries.json"
    jobs.write_text(json.dumps({"marker": str(checkpoints["marker"]), "entries": entries}))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_untrusted_checkpoint", str(jobs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = dict(line[len(RESULT) :].split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(RESULT))
    assert sorted(results) == sorted(name for name, _, _ in entries)
    for name, _, argv in entries:
        where = (
            checkpoints["tmp"] / "resume" / "checkpoint_last.pt"
            if "resume" in name
            else argv[argv.index(str(checkpoints["config_model"]))]
        )
        assert results[name].startswith(f"CheckpointRefusedError: refusing to load checkpoint {where}"), results[name]
        assert "cfg.model.encoder_xformers_att_config" in results[name] and "payload ran" not in results[name]
    assert not checkpoints["marker"].exists()


RESULT = "@@@ RESULT "


def entry_points_main(jobs_file: str) -> None:
    """Run each entry point in turn (console scripts through their cli_main, scripts as __main__); print
    how each ended and whether the payload ran."""
    import importlib

    jobs = json.loads(Path(jobs_file).read_text())
    marker = Path(jobs["marker"])
    for name, target, argv in jobs["entries"]:
        sys.argv = [target, *argv]
        try:
            if target.endswith(".py"):
                runpy.run_path(str(REPO / target), run_name="__main__")
            else:
                importlib.import_module(target).cli_main()
            outcome = "no error"
        except BaseException as err:  # SystemExit too
            outcome = f"{type(err).__name__}: {err}".replace("\n", " ")
            traceback.print_exc()
        ran = " (payload ran)" if marker.exists() else ""
        print(f"{RESULT}{name}: {outcome}{ran}", flush=True)


if __name__ == "__main__":
    entry_points_main(sys.argv[1])
