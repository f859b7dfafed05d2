"""Issue 18: every pair of methods the registry allows in one run (`robustft_common.methods.COMBINATIONS`) trains
end to end on the tiny RoBERTa, each method's own signal logged; every refused pair stops at startup with an
error naming the flag; Mixout started from a pretrained checkpoint mixes towards that checkpoint's weights.

All runs share one launcher process (tests/test_distributed.py `run_launcher`): fairseq's imports dominate a
tiny run. R-Drop, NEFTune and Mixout alone are in the data-parallel and resume matrices (registry methods).
"""

import dataclasses
import math

import pytest
import torch

from robustft_common import refusals
from robustft_common.methods import COMBINATIONS
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_distributed import job_error, load_state, run_launcher, split_by_job, train_records

# fairseq-train runs / training in-process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

UPDATES = 2
ALLOWED = [c.name for c in COMBINATIONS.values() if c.refused_by is None]
REFUSED = [c.name for c in COMBINATIONS.values() if c.refused_by is not None]
REFUSAL_FLAGS = {  # flags a component accepts only to refuse them (robustft_common/refusals.py)
    "--" + f.name.replace("_", "-")
    for flags in (refusals.RefusedR3FFlags, refusals.RefusedNeftuneFlags, refusals.RefusedChildTuningFlags)
    for f in dataclasses.fields(flags)
    if not f.name.startswith("_")
}


def _argv(data, save_dir, *flags):
    extra = ["--pats-log-stats"] if "adamax_pats" in flags else []
    return [str(a) for a in sentence_prediction_args(data, save_dir, *flags, *extra, max_update=UPDATES)]


@pytest.fixture(scope="module")
def runs(sp_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combinations")
    pretrained = tmp / "vanilla" / "checkpoint_last.pt"
    jobs = [{"name": "vanilla", "argv": _argv(sp_data, tmp / "vanilla")}]
    jobs += [{"name": name, "argv": _argv(sp_data, tmp / name, *COMBINATIONS[name].flags)} for name in ALLOWED]
    mixout = COMBINATIONS["mixout+hype_n"].flags  # Mixout (+ HyPe) from the vanilla run's weights
    jobs.append(
        {
            "name": "mixout_pretrained",
            "argv": _argv(sp_data, tmp / "mixout_pretrained", *mixout, "--finetune-from-model", pretrained),
        }
    )
    jobs += [
        {"name": name, "argv": _argv(sp_data, tmp / name, *COMBINATIONS[name].flags), "expect_error": True}
        for name in REFUSED
    ]
    return tmp, split_by_job(run_launcher(jobs, tmp)[0])


# what each method of a pair must have logged in training (its mechanism ran)
SIGNALS = {
    "rdrop": "rdrop_kl",
    "neftune": "neftune_noise_effective",
    "hype_n": "hype_noise_effective",
    "r3f": "r3f_noise_effective",
    "pats": "pats_frac_noised",
    "smart": "smart_adv",
    "freelb": "freelb_delta_norm",
    "childtuning_d": "childtuning_kept",
}


@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_combination_trains(runs, name):
    _, parts = runs
    assert job_error(parts[name]) is None, parts[name][-3000:]
    records = train_records(parts[name])
    assert [int(r["num_updates"]) for r in records] == list(range(1, UPDATES + 1)), parts[name][-3000:]
    assert all(math.isfinite(float(r["loss"])) for r in records)
    for method in COMBINATIONS[name].methods:
        if method in SIGNALS:
            assert all(SIGNALS[method] in r for r in records), (method, records)
            # with Mixout and no dropout R-Drop's passes differ only by W - U, 0 at update 1 and ~lr after it
            # (tests/test_rdrop.py shows KL > 0 once W != U)
            if COMBINATIONS[name].methods != ("rdrop", "mixout"):
                assert all(float(r[SIGNALS[method]]) > 0 for r in records), (method, records)
        if method == "mixout":
            assert "Mixout: p=0.9 (exact gradient) on 12 linear layers" in parts[name]
        if method == "sage":
            assert "adamax_sage" in parts[name]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_combination_names_the_flag(runs, name):
    _, parts = runs
    assert job_error(parts[name]) is not None, f"{name} trained"
    assert COMBINATIONS[name].refused_by in parts[name]
    assert "unrecognized arguments" not in parts[name]  # argparse's bare message says nothing of why
    if COMBINATIONS[name].refused_by in REFUSAL_FLAGS:  # another component's flags: the registry's reason
        assert COMBINATIONS[name].why in parts[name]
    assert not train_records(parts[name])  # refused before the first update


def test_mixout_targets_are_the_pretrained_weights(runs):
    tmp, parts = runs
    assert job_error(parts["mixout_pretrained"]) is None, parts["mixout_pretrained"][-3000:]
    assert "mix towards the checkpoint weights" in parts["mixout_pretrained"]
    pretrained = load_state(tmp / "vanilla" / "checkpoint_last.pt")["model"]
    tuned = load_state(tmp / "mixout_pretrained" / "checkpoint_last.pt")["model"]
    targets = [k for k in tuned if k.endswith(".mixout_target")]
    assert len(targets) == 12 and set(tuned) - set(targets) == set(pretrained)  # stock keys otherwise
    for key in targets:
        weight = key.replace(".mixout_target", ".weight")
        assert torch.equal(tuned[key], pretrained[weight])
        assert not torch.equal(tuned[weight], pretrained[weight])  # the weights trained away from it
