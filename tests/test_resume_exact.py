"""Resume exactness for every method: N updates straight == N/2 updates, a NEW process resuming from that
checkpoint_last.pt, N/2 more -- bit-identical parameters, buffers (R4F's spectral-norm u/v) and optimizer
state (PATS/SAGE EMAs), and the same logged losses, with dropout on.

Why this holds (docs/distributed.md, "Resume"): fairseq reseeds torch's global RNG at every update with
seed + num_updates (fairseq/trainer.py:799 -> _set_seed, :1371-1375), so dropout and the R3F/HyPe noise
(drawn from the global RNG) depend only on the update number; PATS/SAGE reseed their own generator per
update and keep their EMAs in the optimizer state; the data iterator position is in the checkpoint.

The straight run saves at update N/2 (`--save-interval-updates`); that checkpoint becomes the resumed
run's checkpoint_last.pt. All straight runs share one launcher process, all resumed runs another.
"""

import shutil

import pytest

from tests.test_distributed import (
    METHODS,
    SENTENCE_PREDICTION_METHODS,
    assert_states_equal,
    job_error,
    load_state,
    make_sp_data,
    make_t2t_data,
    method_argv,
    run_launcher,
    split_by_job,
    train_records,
)

# fairseq-train runs / training in-process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

N = 4  # 48 examples / batch 16 = 3 updates per epoch: the resumed half crosses the epoch boundary
HALF = N // 2
TIMING_KEYS = {"wps", "ups", "wpb_per_sec", "train_wall", "wall", "gb_free"}

# combinations and the update-frequency path, on top of the per-method matrix
EXTRA = {
    "r3f_hype_pats_updfreq2": [
        "--criterion",
        "sentence_prediction_r3f",
        "--eps",
        "1e-2",
        "--hype-type",
        "normal",
        "--hype-eps",
        "1e-2",
        "--optimizer",
        "adamax_pats",
        "--pats-noise",
        "1e-3",
        "--update-freq",
        "2",
        "--batch-size",
        "8",
    ],  # still 3 updates per epoch
    # fp16 loss-scaler state; CPU fp16 cannot survive an overflow (fairseq/trainer.py:1023): low scale
    "r3f_hype_memory_efficient_fp16": [
        "--criterion",
        "sentence_prediction_r3f",
        "--eps",
        "1e-2",
        "--hype-type",
        "normal",
        "--hype-eps",
        "1e-2",
        "--memory-efficient-fp16",
        "--fp16-init-scale",
        "4",
    ],
}
CASES = [*METHODS, "noisytune", *EXTRA]


def _argv(case, data, save_dir, pretrained):
    sp, t2t = data
    if case == "noisytune":  # NoisyTune only applies to a --finetune-from-model start
        extra = [
            "--optimizer",
            "adamax_pats",
            "--pats-noise",
            "1e-3",
            "--noisytune-lambda",
            "0.15",
            "--finetune-from-model",
            str(pretrained),
        ]
        return method_argv("vanilla", sp, t2t, save_dir, N, *extra, "--save-interval-updates", str(HALF))
    if case in EXTRA:
        return method_argv("vanilla", sp, t2t, save_dir, N, *EXTRA[case], "--save-interval-updates", str(HALF))
    return method_argv(case, sp, t2t, save_dir, N, "--save-interval-updates", str(HALF))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_sp_data(tmp), make_t2t_data(tmp)
    pretrained = tmp / "straight_vanilla" / "checkpoint_last.pt"  # vanilla runs first (METHODS[0])
    assert METHODS[0] == "vanilla"
    straight = [{"name": c, "argv": _argv(c, data, tmp / f"straight_{c}", pretrained)} for c in CASES]
    straight_out = split_by_job(run_launcher(straight, tmp)[0])
    resumed = []
    for c in CASES:
        (tmp / f"resumed_{c}").mkdir()
        shutil.copy(tmp / f"straight_{c}" / f"checkpoint_1_{HALF}.pt", tmp / f"resumed_{c}" / "checkpoint_last.pt")
        resumed.append({"name": c, "argv": _argv(c, data, tmp / f"resumed_{c}", pretrained)})
    # negative control: resuming R3F with another --seed must NOT reproduce the straight run
    (tmp / "control").mkdir()
    shutil.copy(tmp / "straight_r3f" / f"checkpoint_1_{HALF}.pt", tmp / "control" / "checkpoint_last.pt")
    resumed.append({"name": "control", "argv": [*_argv("r3f", data, tmp / "control", pretrained), "--seed", "2"]})
    resumed_out = split_by_job(run_launcher(resumed, tmp)[0])
    return tmp, straight_out, resumed_out


@pytest.mark.parametrize("case", CASES)
def test_resume_is_exact(runs, case):
    tmp, straight_out, resumed_out = runs
    assert job_error(straight_out[case]) is None and job_error(resumed_out[case]) is None
    assert f"@ {HALF} updates" in resumed_out[case] and "Loaded checkpoint" in resumed_out[case]

    a = load_state(tmp / f"straight_{case}" / "checkpoint_last.pt")
    b = load_state(tmp / f"resumed_{case}" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == N
    assert_states_equal(a["model"], b["model"], "model")
    assert_states_equal(a["last_optimizer_state"], b["last_optimizer_state"], "optimizer")
    # the run really trained after the resume point (else equality would be trivial)
    mid = load_state(tmp / f"straight_{case}" / f"checkpoint_1_{HALF}.pt")
    assert any(not v.equal(mid["model"][k]) for k, v in a["model"].items() if v.is_floating_point())

    straight_logs = {int(r["num_updates"]): r for r in train_records(straight_out[case])}
    resumed_logs = {int(r["num_updates"]): r for r in train_records(resumed_out[case])}
    assert sorted(resumed_logs) == list(range(HALF + 1, N + 1)), resumed_out[case][-3000:]
    for step, rec in resumed_logs.items():
        ref = straight_logs[step]
        same_keys = sorted(set(rec) - TIMING_KEYS)
        assert same_keys == sorted(set(ref) - TIMING_KEYS)
        assert {k: rec[k] for k in same_keys} == {k: ref[k] for k in same_keys}, step


def test_control_other_seed_diverges(runs):
    """The comparison is sensitive: a different seed after the resume point changes the weights."""
    tmp, _, resumed_out = runs
    assert job_error(resumed_out["control"]) is None
    a = load_state(tmp / "straight_r3f" / "checkpoint_last.pt")["model"]
    b = load_state(tmp / "control" / "checkpoint_last.pt")["model"]
    assert any(not a[k].equal(b[k]) for k in a if a[k].is_floating_point())


def test_methods_with_dropout_and_noise_are_covered():
    """The matrix is not vacuous: every method of the plugin is in it, with dropout at fairseq's 0.1."""
    assert {"r3f", "r4f", "hype", "adamax_pats", "adamax_sage", "hyperdecoder"} <= set(CASES)
    assert not any("--dropout" in a for a in SENTENCE_PREDICTION_METHODS.values())


def test_noisytune_not_reapplied_on_resume(runs):
    _, straight_out, resumed_out = runs
    assert "NoisyTune applied" in straight_out["noisytune"]
    assert "NoisyTune applied" not in resumed_out["noisytune"]


def test_childtuning_fisher_pass_not_redone_on_resume(runs):
    """ChildTuning-D's child network is in the optimizer state: the resumed half trains with it, no second pass."""
    _, straight_out, resumed_out = runs
    assert "ChildTuning-D: Fisher pass over" in straight_out["childtuning_d"]
    assert "ChildTuning-D: Fisher pass" not in resumed_out["childtuning_d"]
