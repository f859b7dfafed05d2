"""The method registry (robustft_common/methods.py): every method's flags are valid fairseq-train flags that
build the components it names, its recipe agrees with its flags, and the helpers that derive from it
(overrides, the shell form glue.sh reads) keep the flags intact."""

import os
import shlex
import subprocess
import sys

import pytest

from robustft_common import methods
from robustft_common.methods import METHODS, flag_value, get_method, method_flags
from tests.fairseq_helpers import REPO, TINY_ROBERTA


def _parse(flags):
    """fairseq's own parser over a full sentence-prediction command line (raises on an unknown flag)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import robustft  # noqa: F401  (registers the plugin's components)

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            "/nonexistent",
            "--user-dir",
            str(REPO / "robustft"),
            "--task",
            "sentence_prediction",
            "--num-classes",
            "2",
            *TINY_ROBERTA,
            "--cpu",
            "--lr",
            "1e-5",
            *flags,
        ],
    )
    return convert_namespace_to_omegaconf(args)


@pytest.mark.parametrize("name", list(METHODS))
def test_flags_parse_and_select_the_components_the_method_needs(name):
    method = get_method(name)
    cfg = _parse(method.flags)
    chosen = {"criterion": cfg.criterion._name, "optimizer": cfg.optimizer._name, "task": cfg.task._name}
    for kind, component in method.needs:
        assert chosen[kind] == component, (name, kind)
    # the family's optimizer, or one built on it (adamax_pats, adam_childtuning)
    assert chosen["optimizer"].split("_")[0] == method.optimizer_family


def test_needed_components_are_registered():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.optim import OPTIMIZER_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    import robustft  # noqa: F401

    registries = {"criterion": CRITERION_REGISTRY, "optimizer": OPTIMIZER_REGISTRY, "task": TASK_REGISTRY}
    for method in METHODS.values():
        for kind, component in method.needs:
            assert component in registries[kind], (method.name, kind, component)


def test_recipe_values_are_the_flags_values():
    """Two representations of one recipe (flags for fairseq, recipe dict for tables) agree."""
    numeric = {
        "r3f_lambda": "--r3f-lambda",
        "eps": "--eps",
        "hype_eps": "--hype-eps",
        "pats_noise": "--pats-noise",
        "pats_beta": "--pats-beta",
        "pats_margin": "--pats-margin",
        "sage_beta3": "--sage-beta3",
        "noisytune_lambda": "--noisytune-lambda",
        "rdrop_alpha": "--rdrop-alpha",
        "neftune_alpha": "--neftune-alpha",
        "mixout_p": "--mixout-p",
        "childtuning_reserve_p": "--childtuning-reserve-p",
        "smart_lambda": "--smart-lambda",
        "smart_steps": "--smart-steps",
        "smart_step_size": "--smart-step-size",
        "smart_noise_std": "--smart-noise-std",
        "smart_eps": "--smart-eps",
        "smart_mu": "--smart-mu",
        "freelb_steps": "--freelb-steps",
        "freelb_adv_lr": "--freelb-adv-lr",
        "freelb_init_mag": "--freelb-init-mag",
        "freelb_max_norm": "--freelb-max-norm",
    }
    textual = {"noise_type": "--noise-type", "hype_uniform": "--hype-uniform", "childtuning_mode": "--childtuning-mode"}
    for m in METHODS.values():
        for key, flag in numeric.items():
            if key in m.recipe and flag_value(m.flags, flag) is not None:
                assert float(flag_value(m.flags, flag)) == m.recipe[key], (m.name, key)
        for key, flag in textual.items():
            if key in m.recipe:
                assert flag_value(m.flags, flag) == m.recipe[key], (m.name, key)
        if "hype_type" in m.recipe:
            assert flag_value(m.flags, "--hype-type") == m.recipe["hype_type"]
            assert flag_value(m.flags, "--dropout") == "0.0"  # HyPe replaces dropout (README: --dropout_rate 0)
        if m.optimizer_family == "adamax":
            assert "--no-bias-correction" in m.flags and m.recipe["bias_correction"] is False
        assert m.source and m.description and m.label


def test_baselines_and_families():
    for m in METHODS.values():
        if m.baseline is None:
            continue
        base = get_method(m.baseline)
        assert base.baseline is None and base.optimizer_family == m.optimizer_family, m.name
    assert [m.name for m in METHODS.values() if m.baseline is None] == ["vanilla", "vanilla_adamax"]
    assert {m.optimizer_family for m in METHODS.values()} == {"adam", "adamax"}


def test_r3f_recipe_resolves_the_old_disagreement():
    """issue 13: one R3F setting everywhere: the fairseq rxf README recipe (lambda 0.7, uniform, eps 1e-5)."""
    cfg = _parse(METHODS["r3f"].flags)
    assert (cfg.criterion.r3f_lambda, cfg.criterion.eps, cfg.criterion.noise_type) == (0.7, 1e-5, "uniform")
    assert METHODS["hype_r3f"].flags[:8] == METHODS["r3f"].flags[:8]  # the same R3F part


def test_hype_uniform_variants_are_named_for_what_they_draw():
    """issue 14 item 5: the paper's symmetric U(-eps, eps) and the official code's one-sided U[0, eps)."""
    sym, official, normal = (_parse(METHODS[m].flags).criterion for m in ("hype_u", "hype_u_official", "hype_n"))
    assert (sym.hype_type, sym.hype_uniform, sym.hype_eps) == ("uniform", "symmetric", 1e-5)
    assert (official.hype_type, official.hype_uniform, official.hype_eps) == ("uniform", "one_sided", 1e-5)
    assert normal.hype_type == "normal"
    assert (
        "official" in METHODS["hype_u_official"].label and METHODS["hype_u"].label != METHODS["hype_u_official"].label
    )


def test_sage_runs_with_sage_settings():
    """issue 14 item 4: SAGE's own Adamax: no first-moment bias correction, weight decay 0.01 on weights only."""
    from robustft_common.param_filters import NO_DECAY

    opt = _parse(METHODS["sage"].flags).optimizer
    assert opt._name == "adamax_sage" and opt.no_bias_correction and opt.weight_decay == 0.01
    assert opt.weight_decay_exclude == NO_DECAY and opt.sage_beta3 == 0.75
    for name in ("pats", "noisytune"):  # the same mt-dnn Adamax under PATS and NoisyTune
        other = _parse(METHODS[name].flags).optimizer
        assert other.no_bias_correction and other.weight_decay_exclude == NO_DECAY, name
    base = _parse(METHODS["vanilla_adamax"].flags).optimizer
    assert base._name == "adamax" and base.no_bias_correction and base.weight_decay == 0.01


def test_overrides_replace_or_drop_flags():
    flags = method_flags("hype_r3f", {"--eps": "1e-2", "--dropout": None, "--hype-eps": 0.01})
    assert flag_value(flags, "--eps") == "1e-2" and flag_value(flags, "--hype-eps") == "0.01"
    assert "--dropout" not in flags and "0.0" not in flags
    assert len(flags) == len(METHODS["hype_r3f"].flags) - 2
    r4f = method_flags("r4f", {"--r4f-spectral-norm-dense": None})
    assert "--r4f-spectral-norm-dense" not in r4f and "--spectral-norm-classification-head" in r4f
    assert METHODS["hype_r3f"].flags == get_method("hype_r3f").flags  # the registry itself is untouched
    with pytest.raises(ValueError, match="method 'r3f' has no flag --hype-eps"):
        method_flags("r3f", {"--hype-eps": "1e-2"})
    with pytest.raises(ValueError, match="switch"):
        method_flags("r4f", {"--r4f-spectral-norm-dense": "1"})


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'vat'; known: vanilla, r3f"):
        get_method("vat")
    with pytest.raises(ValueError, match="'hype' is now hype_n, hype_u or hype_u_official"):
        get_method("hype")


@pytest.mark.e2e
def test_shell_forms_round_trip_through_bash(capsys):
    """What glue.sh evaluates gives back exactly the registry's flags (regex quoting included)."""
    assert methods.main(["flags", "sage"]) == 0
    assert shlex.split(capsys.readouterr().out) == list(METHODS["sage"].flags)
    assert methods.main(["bash", "sage"]) == 0
    script = capsys.readouterr().out + 'printf "%s\\n" "${METHOD_FLAGS[@]}"; echo "$METHOD_FAMILY $METHOD_SCHEDULE"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:-1] == list(METHODS["sage"].flags) and out[-1] == "adamax pats_adamax"
    assert methods.main(["flags", "nope"]) == 2 and "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.parametrize(
    "method,checks",
    [
        # HyPe's paper setting overrides the family's Adam after the method's flags: the last value wins
        (
            "hype_u_official",
            {
                "--adam-betas": "(0.9,0.999)",
                "--weight-decay": "0.01",
                "--hype-uniform": "one_sided",
                "--dropout": "0.0",
                "--max-epoch": "3",
            },
        ),
        (
            "sage",
            {
                "--optimizer": "adamax_sage",
                "--weight-decay": "0.01",
                "--best-checkpoint-metric": "mcc",
                "--max-epoch": "10",
            },
        ),
    ],
)
def test_glue_recipe_dry_run_uses_the_registry(method, checks, tmp_path):
    env = dict(
        os.environ,
        DRY_RUN="1",
        DATA_ROOT=str(tmp_path),
        ROBERTA_PATH=str(tmp_path / "model.pt"),
        PY=sys.executable,
        SAVE_ROOT=str(tmp_path / "ckpt"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "recipes" / "glue.sh"), "CoLA", method],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = shlex.split(proc.stdout)
    for flag, value in checks.items():
        assert flag_value(args, flag) == value, (flag, args)
    assert all(f in args for f in METHODS[method].flags)  # every registry flag reached the command
    assert "--report-mcc" in args and "--num-classes" in args  # CoLA's flags from the GLUE task table


def test_refused_flags_stop_with_the_registry_reason():
    """A component that refuses another method's flags (robustft_common/refusals.py) names every given flag,
    both methods and the registry's reason; without those flags it says nothing."""
    from types import SimpleNamespace

    from robustft_common import refusals

    refusals.check_refused(SimpleNamespace(r3f_lambda=None, eps=None), "rdrop", refusals.RefusedR3FFlags)
    with pytest.raises(ValueError) as err:
        refusals.check_refused(SimpleNamespace(r3f_lambda="0.7", eps="1e-5"), "rdrop", refusals.RefusedR3FFlags)
    text = str(err.value)
    assert text.startswith("--r3f-lambda, --eps: R-Drop and R3F do not run together")
    assert methods.COMBINATIONS["rdrop+r3f"].why in text
    # every refusal class belongs to a method some refused pair names, with the flag the pair says stops it
    for flags in (refusals.RefusedR3FFlags, refusals.RefusedNeftuneFlags, refusals.RefusedChildTuningFlags):
        pairs = [
            c
            for c in methods.COMBINATIONS.values()
            if c.refused_by and c.refused_by.lstrip("-").replace("-", "_") in flags.__dataclass_fields__
        ]
        assert pairs and all(flags.METHOD in c.methods for c in pairs), flags
