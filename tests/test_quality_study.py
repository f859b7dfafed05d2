"""The quality study's bookkeeping (robustft_experiments/quality.py) on hand-written fairseq logs:
lr choice from the held-out grid only, final-epoch values, paired table, report files."""

import json
from pathlib import Path

import pytest

from robustft_common.methods import get_method
from robustft_experiments import quality


def _log(path: Path, metric: str, values, status="ok"):
    path.mkdir(parents=True, exist_ok=True)
    lines = [
        f"INFO:valid:epoch {i + 1:03d} | valid on 'valid' subset | loss 0.5 | {metric} {v} | num_updates {63 * (i + 1)}"
        for i, v in enumerate(values)
    ]
    (path / "train.log").write_text("\n".join(lines) + "\n")
    (path / "status.json").write_text(
        json.dumps({"status": status, "returncode": 0 if status == "ok" else 1, "seconds": 1.0})
    )


def _main_report(tmp_path: Path, task: str, metric: str, per_seed: dict) -> list[str]:
    """results.md lines of a report over hand-written main runs: per_seed = {seed: {method: final value}}."""
    runs = tmp_path / "runs"
    for seed, values in per_seed.items():
        for method, value in values.items():
            _log(runs / "main" / task / method / f"seed{seed}", metric, [value])
    methods = list(next(iter(per_seed.values())))
    return quality.write_report(runs, tmp_path / "results", [task], methods, "python run.py").splitlines()


def _line(lines: list[str], prefix: str) -> str:
    return next(line for line in lines if line.startswith(prefix))


def _without_schedule(cmd: list) -> list:
    """A run's command without the flags a schedule change (and the run's folder) set."""
    cmd = list(cmd)
    for flag in ("--max-epoch", "--max-update", "--total-num-update", "--warmup-updates", "--save-dir"):
        del cmd[cmd.index(flag) : cmd.index(flag) + 2]
    return cmd


def _only_value_differs(control: list, base: list, flag: str, value: str) -> int:
    """Asserts that `control` is `base` with `flag`'s value (given once, in the same place) set to `value`."""
    i = base.index(flag)
    assert control.count(flag) == 1 and control[i + 1] == value
    assert control[: i + 1] + control[i + 2 :] == base[: i + 1] + base[i + 2 :]
    return i


def test_final_value_is_the_last_validation_not_the_best():
    text = "\n".join(
        f"| valid on 'valid' subset | loss 1 | mcc {v} | num_updates {n}"
        for v, n in ((40.0, 63), (52.5, 126), (47.0, 189))
    )
    assert quality.final_and_best(text, "mcc") == {
        "final": 47.0,
        "best": 52.5,
        "validations": 3,
        "final_num_updates": 189,
    }
    assert quality.final_and_best("no validation here", "mcc") is None


def test_lr_is_chosen_on_the_grid_mean_and_waits_for_every_grid_run(tmp_path):
    protocol = dict(quality.PROTOCOL, lr_grid={"adam": (1e-5, 2e-5)}, grid_seeds=(101, 102))
    grid = tmp_path / "grid" / "CoLA"
    _log(grid / "vanilla@lr1e-05" / "seed101", "mcc", [10, 30])
    _log(grid / "vanilla@lr2e-05" / "seed101", "mcc", [10, 50])
    assert quality.chosen_lrs(tmp_path, ["CoLA"], ["adam"], protocol) == {"CoLA": {"adam": None}}
    _log(grid / "vanilla@lr1e-05" / "seed102", "mcc", [10, 40])
    _log(grid / "vanilla@lr2e-05" / "seed102", "mcc", [90, 10])  # best epoch high, final low: final counts
    # means of the final values: 1e-5 -> 35, 2e-5 -> 30
    assert quality.chosen_lrs(tmp_path, ["CoLA"], ["adam"], protocol) == {"CoLA": {"adam": 1e-5}}


def test_a_control_with_lr_factors_chooses_its_own_lr_among_multiples_of_its_family_lr(tmp_path, monkeypatch):
    data = tmp_path / "grid-bin"
    (data / "label").mkdir(parents=True)
    (data / "label" / "train.label").write_text("1\n" * 1000)
    protocol = dict(quality.PROTOCOL, lr_grid={"adamax": (1e-4, 2e-4)}, grid_seeds=(101, 102))
    control = quality.CONTROLS["sage_own_lr"]
    assert control.base == "sage" and control.lr_factors == (1, 2, 5)
    assert quality.lr_group("sage_own_lr") == "sage_own_lr" and quality.lr_group("sage") == "adamax"
    grid = tmp_path / "grid" / "CoLA"
    # nothing to choose among until the family's lr is chosen
    assert quality.grid_candidates("sage_own_lr", {"adamax": None}, protocol) == ("sage", ())
    for seed, (a, b) in {101: (5, 9), 102: (7, 3)}.items():  # adamax: 1e-4 -> 6, 2e-4 -> 6: tie, smaller
        _log(grid / f"vanilla_adamax@lr{1e-4:g}" / f"seed{seed}", "mcc", [a])
        _log(grid / f"vanilla_adamax@lr{2e-4:g}" / f"seed{seed}", "mcc", [b])
    assert quality.chosen_lrs(tmp_path, ["CoLA"], ["sage_own_lr"], protocol)["CoLA"] == {
        "adamax": 1e-4,
        "sage_own_lr": None,
    }
    assert quality.grid_candidates("sage_own_lr", {"adamax": 1e-4}, protocol) == ("sage", (1e-4, 2e-4, 5e-4))
    for seed, vals in {101: (1, 8, 4), 102: (2, 6, 9)}.items():  # means 1.5, 7, 6.5
        for lr, v in zip(("0.0001", "0.0002", "0.0005"), vals):
            _log(grid / f"sage@lr{lr}" / f"seed{seed}", "mcc", [50, v])
    lrs = quality.chosen_lrs(tmp_path, ["CoLA"], ["adamax", "sage_own_lr"], protocol)
    assert lrs == {"CoLA": {"adamax": 1e-4, "sage_own_lr": 2e-4}}
    # the grid stage asked for the control alone plans its runs from its family's finished grid
    monkeypatch.setattr(quality, "prepare_data", lambda *a, **k: data)
    pretrained = {"model": tmp_path / "m" / "model.pt", "train_args": []}
    runs = quality.grid_runs(tmp_path, tmp_path, tmp_path, ["CoLA"], ["sage_own_lr"], pretrained, protocol)
    assert [(r["method"], r["lr"], r["seed"]) for r in runs] == [
        ("sage", lr, seed) for lr in (1e-4, 2e-4, 5e-4) for seed in (101, 102)
    ]
    assert runs[2]["dir"] == grid / "sage@lr0.0002" / "seed101"
    # the control trains SAGE's registry flags, unchanged, at its own lr
    assert quality.study_flags("sage_own_lr") == quality.study_flags("sage")
    header = quality.lr_column("sage_own_lr", protocol)
    assert header == "SAGE at its own lr (control): lr (grid x1, x2, x5 of the adamax lr)"


def test_noisytune_epoch_diagnostics_differ_only_in_epochs():
    # the 3-epoch run is the control that makes the 10-epoch one readable: same pair, same split, study epochs
    short, long = quality.DIAGNOSTICS["noisytune_3_epochs"], quality.DIAGNOSTICS["noisytune_10_epochs"]
    assert short.methods == long.methods == ("vanilla_adamax", "noisytune")
    assert dict(short.changes) == {} and dict(long.changes) == {"epochs": 10}


@pytest.mark.parametrize(
    "name, task, lrs",
    [
        ("pats_10_epochs", "CoLA", {"adamax": 2e-4, "adam": 5e-5}),
        ("noisytune_10_epochs", "CoLA", {"adamax": 2e-4, "adam": 5e-5}),
        ("r3f_10_epochs", "SST-2", {"adam": 1e-4}),
    ],
)
def test_diagnostic_runs_change_only_the_protocol_they_name_and_score_on_held_out_train(
    tmp_path, monkeypatch, name, task, lrs
):
    diag = quality.DIAGNOSTICS[name]
    assert dict(diag.changes) == {"epochs": 10}
    base, method = diag.methods
    lr = lrs[quality.lr_group(method)]  # each at its family's study lr, not the other family's
    data = tmp_path / "grid-bin"
    (data / "label").mkdir(parents=True)
    (data / "label" / "train.label").write_text("1\n" * 1000)
    pretrained = {"model": tmp_path / "m" / "model.pt", "train_args": []}
    monkeypatch.setattr(quality, "prepare_data", lambda *a, **k: data)  # no binarization in this unit test
    runs = quality.diagnostic_runs(tmp_path, tmp_path / "runs", tmp_path, [task], [name], {task: lrs}, pretrained)
    assert [(r["method"], r["seed"]) for r in runs] == [(base, 101), (method, 101), (base, 102), (method, 102)]
    study = quality.train_command(task, method, 101, lr, data, tmp_path / "x", pretrained, 1000)
    cmd = runs[1]["cmd"]
    assert cmd[cmd.index("--max-epoch") + 1] == "10" and cmd[cmd.index("--max-update") + 1] == str(10 * 63)
    assert cmd[cmd.index("--warmup-updates") + 1] == "63"

    # everything else is the study's command of the same run
    assert _without_schedule(cmd) == _without_schedule(study) and cmd[cmd.index("--lr") + 1] == f"{lr:g}"
    assert runs[1]["dir"] == tmp_path / "runs" / "diagnostics" / task / name / method / "seed101"


def test_diagnostic_table_pairs_final_held_out_values(tmp_path):
    diag = quality.DIAGNOSTICS["pats_10_epochs"]
    root = tmp_path / "diagnostics" / "CoLA" / "pats_10_epochs"
    assert quality.diagnostic_table(tmp_path, "CoLA", diag) is None
    _log(root / "vanilla_adamax" / "seed101", "mcc", [0, 10, 20])
    _log(root / "vanilla_adamax" / "seed102", "mcc", [0, 14, 30])
    _log(root / "pats" / "seed101", "mcc", [0, 12, 23])
    _log(root / "pats" / "seed102", "mcc", [2, 12, 29])
    table = quality.diagnostic_table(tmp_path, "CoLA", diag)
    adamax = next(line for line in table.splitlines() if line.startswith("| Vanilla (Adamax) |"))
    assert "| 0.0 / 12.0 / 25.0 |" in adamax and "20 (seed 101), 30 (seed 102)" in adamax
    pats = next(line for line in table.splitlines() if line.startswith(f"| {get_method('pats').label} |"))
    # diffs +3, -1: mean +1, sd 2.83, t(0.975, 1) = 12.706 -> half-width 25.41
    assert "| 1.0 / 12.0 / 26.0 |" in pats and "+1.00 [-24.41, +26.41], wins 1/2" in pats


def test_study_flags_apply_the_protocol_optimizer_settings():
    flags = quality.study_flags("r3f")
    assert flags[flags.index("--weight-decay") + 1] == "0.01"
    assert flags[flags.index("--adam-betas") + 1] == "(0.9,0.999)"
    assert flags.count("--weight-decay") == 1
    pats = quality.study_flags("pats")
    assert "--adam-betas" not in pats and pats[pats.index("--weight-decay") + 1] == "0.01"
    assert quality.num_updates(1000) == 3 * 63


def test_report_pairs_each_method_with_its_baseline(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    for seed, (v, r) in {1: (50.0, 52.0), 2: (48.0, 47.0), 3: (51.0, 55.0)}.items():
        _log(runs / "main" / "CoLA" / "vanilla" / f"seed{seed}", "mcc", [30, v])
        _log(runs / "main" / "CoLA" / "r3f" / f"seed{seed}", "mcc", [30, r])
    _log(runs / "main" / "CoLA" / "hype_n" / "seed1", "mcc", [], status="failed")
    text = quality.write_report(runs, results, ["CoLA"], ["vanilla", "r3f", "hype_n"], "python run.py")
    row = next(line for line in text.splitlines() if line.startswith(f"| {get_method('r3f').label} |"))
    # diffs +2, -1, +4: mean 5/3, 2 wins of 3
    assert "51.33 ± 4.04 (n=3)" in row  # 52, 47, 55
    # diffs +2, -1, +4: sd 2.517, t(0.975, 2) = 4.3027 -> half-width 6.25
    assert "+1.67 [-4.58, +7.92], wins 2/3 (vs Vanilla)" in row
    failed = next(line for line in text.splitlines() if line.startswith(f"| {get_method('hype_n').label} |"))
    assert failed.rstrip().endswith("| 1 |")
    assert (results / "CoLA.png").stat().st_size > 0
    saved = json.loads((results / "results.json").read_text())
    assert saved["lrs"] == {"CoLA": {"adam": None}} and len(saved["runs"]) == 7


@pytest.mark.parametrize("task,floor", [("RTE", 100 * 146 / 277), ("CoLA", 0.0)])
def test_plot_floor_is_the_majority_class(task, floor):
    assert quality.floor_of(task)[0] == pytest.approx(floor)


def test_plot_axis_spans_floor_seeds_and_anchor():
    assert quality.axis_range([52.0, 49.8], 52.71, 56.7) == (48, 58)  # RTE: seeds below majority, anchor above
    assert quality.axis_range([52.0, 49.8], 52.71, None) == (48, 54)
    assert quality.axis_range([7.4, -0.4], 0.0, 23.6) == (-2, 25)


def test_dropout_control_is_vanilla_with_only_dropout_off():
    control = quality.study_flags("vanilla_dropout0")
    vanilla = quality.study_flags("vanilla")
    assert control == vanilla + ["--dropout", "0.0"]
    assert quality.spec_of("vanilla_dropout0").baseline == "vanilla"
    assert quality.spec_of("vanilla_dropout0").optimizer_family == "adam"
    with pytest.raises(ValueError, match="unknown method"):
        quality.spec_of("nope")


def test_eps0_control_replaces_hype_eps_and_report_compares_it(tmp_path):
    hype, control = quality.study_flags("hype_n"), quality.study_flags("hype_n_eps0")
    _only_value_differs(control, hype, "--hype-eps", "0")
    methods = ("vanilla", "hype_n", "vanilla_dropout0", "hype_n_eps0")
    per_seed = {1: (1, 3, 5, 3), 2: (2, 4, 7, 4), 3: (0, 5, 6, 5)}
    lines = _main_report(tmp_path, "CoLA", "mcc", {s: dict(zip(methods, v)) for s, v in per_seed.items()})
    assert "+0.00 [+0.00, +0.00], wins 0/3" in _line(lines, "| HyPe-N − HyPe-N, eps 0 (control) |")
    # eps 0 - dropout 0: -2, -3, -1: mean -2, sd 1, half-width 4.3027 / sqrt(3) = 2.48
    assert "-2.00 [-4.48, +0.48], wins 0/3" in _line(lines, "| HyPe-N, eps 0 (control) − Vanilla, dropout 0")


def test_lr_table_marks_a_choice_at_the_grid_edge(tmp_path):
    protocol = dict(quality.PROTOCOL, lr_grid={"adam": (1e-5, 2e-5, 4e-5)}, grid_seeds=(101,))
    grid = tmp_path / "runs" / "grid" / "CoLA"
    for lr, v in ((1e-5, 3), (2e-5, 5), (4e-5, 9)):  # the largest wins
        _log(grid / f"vanilla@lr{lr:g}" / "seed101", "mcc", [v])
    lrs = quality.chosen_lrs(tmp_path / "runs", ["CoLA"], ["adam"], protocol)["CoLA"]
    assert quality.grid_edge("adam", lrs, protocol) == "top"
    assert quality.lr_cell(lrs["adam"], "top") == "4e-05 (grid's top)"
    assert quality.lr_cell(lrs["adam"], None) == "4e-05"  # an lr fixed elsewhere has no grid
    assert quality.grid_edge("adam", {"adam": 2e-5}, protocol) is None
    assert quality.grid_edge("adam", {"adam": 1e-5}, protocol) == "bottom"
    assert quality.lr_cell(None, None) == "pending"
    text = quality.write_report(
        tmp_path / "runs", tmp_path / "results", ["CoLA"], ["vanilla"], "python run.py", protocol
    )
    assert "| CoLA | 4e-05 (grid's top) |" in text
    assert "A choice at its grid's edge" in text


def test_vanilla_own_lr_control_is_vanilla_choosing_again_among_multiples():
    assert quality.study_flags("vanilla_own_lr") == quality.study_flags("vanilla")
    assert quality.lr_group("vanilla_own_lr") == "vanilla_own_lr"
    assert quality.spec_of("vanilla_own_lr").baseline == "vanilla"
    protocol = quality.PROTOCOL
    assert quality.grid_candidates("vanilla_own_lr", {"adam": 1e-4}, protocol) == ("vanilla", (1e-4, 2e-4, 5e-4))


@pytest.mark.parametrize("base", ["mixout", "childtuning_f", "childtuning_d"])
def test_the_masked_gradient_methods_own_lr_controls_are_their_base_choosing_among_multiples(base):
    control = f"{base}_own_lr"
    assert quality.study_flags(control) == quality.study_flags(base)
    assert quality.lr_group(control) == control and quality.spec_of(control).baseline == "vanilla"
    assert quality.grid_candidates(control, {"adam": 1e-4}, quality.PROTOCOL) == (base, (1e-4, 2e-4, 5e-4))
    assert (control, base) in quality.CONTROLS[control].comparisons
    assert (control, "vanilla_own_lr") in quality.CONTROLS[control].comparisons  # both given the same choice


def test_noisytune_own_lr_control_is_noisytune_given_plain_adamaxs_second_choice():
    assert quality.study_flags("noisytune_own_lr") == quality.study_flags("noisytune")
    assert quality.spec_of("noisytune_own_lr").baseline == "vanilla_adamax"
    # the same lrs as plain Adamax's second choice, so the pair with vanilla_adamax_own_lr is like for like
    assert quality.grid_candidates("noisytune_own_lr", {"adamax": 2e-4}, quality.PROTOCOL) == (
        "noisytune",
        (2e-4, 4e-4, 1e-3),
    )
    assert quality.grid_candidates("vanilla_adamax_own_lr", {"adamax": 2e-4}, quality.PROTOCOL)[1] == (2e-4, 4e-4, 1e-3)
    assert ("noisytune_own_lr", "vanilla_adamax_own_lr") in quality.CONTROLS["noisytune_own_lr"].comparisons


def test_an_lr_fixed_elsewhere_is_not_marked_as_a_grid_edge(tmp_path):
    protocol = dict(quality.PROTOCOL, lr_grid={"adam": (1e-5, 2e-5, 4e-5)})
    text = quality.write_report(
        tmp_path / "runs",
        tmp_path / "results",
        ["CoLA"],
        ["vanilla"],
        "python run.py",
        protocol,
        fixed_lrs={"CoLA": {"adam": 4e-5}},  # the grid's top, but chosen elsewhere (as `make demo` does)
        lr_source="lr from the study",
    )
    assert "| CoLA | 4e-05 |" in text
    assert "grid's" not in text


def test_r4f_head_only_control_is_r4f_with_the_kl_weight_zero_and_splits_r4f(tmp_path):
    r4f, control = quality.study_flags("r4f"), quality.study_flags("r4f_head_only")
    i = _only_value_differs(control, r4f, "--r3f-lambda", "0")  # head flags, eps, lr: R4F's
    assert r4f[i + 1] == "0.7"
    assert {"--spectral-norm-classification-head", "--r4f-spectral-norm-dense"} <= set(control)
    assert quality.spec_of("r4f_head_only").baseline == "vanilla"
    assert quality.lr_group("r4f_head_only") == "adam"
    methods = ("vanilla", "r3f", "r4f", "r4f_head_only")
    per_seed = {1: (80, 80, 82, 81), 2: (81, 82, 83, 83), 3: (82, 81, 84, 82)}
    lines = _main_report(tmp_path, "SST-2", "accuracy", {s: dict(zip(methods, v)) for s, v in per_seed.items()})
    # R4F - head only: 1, 0, 2 -> mean 1, sd 1, half-width 4.3027 / sqrt(3) = 2.48
    assert "+1.00 [-1.48, +3.48], wins 2/3" in _line(lines, "| R4F − R4F's head, no R3F term (control) |")
    # R4F - R3F: 2, 1, 3 -> mean 2, sd 1
    assert "+2.00 [-0.48, +4.48], wins 3/3" in _line(lines, "| R4F − R3F |")


def test_head_init_only_control_is_r4f_head_only_plus_one_switch_and_is_compared_with_it(tmp_path):
    head_only, control = quality.study_flags("r4f_head_only"), quality.study_flags("r4f_head_init_only")
    assert control == head_only + ["--r4f-spectral-norm-init-only"]
    assert quality.spec_of("r4f_head_init_only").baseline == "vanilla"
    methods = ("vanilla", "r4f_head_only", "r4f_head_init_only")
    per_seed = {1: (80, 82, 80), 2: (81, 83, 82), 3: (82, 84, 81)}
    lines = _main_report(tmp_path, "SST-2", "accuracy", {s: dict(zip(methods, v)) for s, v in per_seed.items()})
    # head only - init only: 2, 1, 3 -> mean 2, sd 1, half-width 4.3027 / sqrt(3) = 2.48
    assert "+2.00 [-0.48, +4.48], wins 3/3" in _line(
        lines, "| R4F's head, no R3F term (control) − R4F's head, normalised at init only (control) |"
    )


def test_scaled_steps_control_is_the_init_only_control_plus_one_switch_and_sits_between_the_two_heads(tmp_path):
    init_only, control = quality.study_flags("r4f_head_init_only"), quality.study_flags("r4f_head_scaled_steps")
    assert control == init_only + ["--r4f-init-only-scaled-steps"]
    methods = ("vanilla", "r4f_head_only", "r4f_head_init_only", "r4f_head_scaled_steps")
    per_seed = {1: (80, 84, 80, 83), 2: (81, 85, 82, 85), 3: (82, 86, 81, 84)}
    lines = _main_report(tmp_path, "SST-2", "accuracy", {s: dict(zip(methods, v)) for s, v in per_seed.items()})
    scaled = "R4F's head, normalised at init, steps x 1/sigma (control)"
    # head only - scaled steps: 1, 0, 2 -> mean 1, sd 1, half-width 4.3027 / sqrt(3) = 2.48
    assert "+1.00 [-1.48, +3.48], wins 2/3" in _line(lines, f"| R4F's head, no R3F term (control) − {scaled} |")
    # scaled steps - init only: 3, 3, 3 -> mean 3, sd 0
    assert "+3.00 [+3.00, +3.00], wins 3/3" in _line(
        lines, f"| {scaled} − R4F's head, normalised at init only (control) |"
    )


def test_an_lr_cell_reads_not_run_before_its_groups_runs_start_and_pending_after(tmp_path):
    protocol = dict(quality.PROTOCOL, lr_grid={"adam": (1e-5, 2e-5, 4e-5)}, grid_seeds=(101,))
    grid = tmp_path / "runs" / "grid" / "CoLA"
    for lr, v in ((1e-5, 3), (2e-5, 5), (4e-5, 1)):  # adam chooses 2e-5; vanilla_own_lr's x1, x2 are in the grid
        _log(grid / f"vanilla@lr{lr:g}" / "seed101", "mcc", [v])

    def own_lr_cell():
        text = quality.write_report(
            tmp_path / "runs", tmp_path / "results", ["CoLA"], ["vanilla", "vanilla_own_lr"], "python run.py", protocol
        )
        return next(line for line in text.splitlines() if line.startswith("| CoLA |"))

    assert own_lr_cell() == "| CoLA | 2e-05 | not run |"
    # a family whose grid has started but not finished is pending, not "not run" (RTE at 2 of 3 adam lrs)
    rte = tmp_path / "runs" / "grid" / "RTE"
    _log(rte / "vanilla@lr1e-05" / "seed101", "accuracy", [55])
    text = quality.write_report(
        tmp_path / "runs", tmp_path / "results", ["RTE"], ["vanilla", "vanilla_own_lr"], "python run.py", protocol
    )
    assert "| RTE | pending | not run |" in text.splitlines()
    assert "No main run has finished yet" in text and "| method |" not in text  # no empty table
    _log(grid / "vanilla@lr0.0001" / "seed101", "mcc", [2], status="failed")  # x5 started (here: failed)
    assert own_lr_cell() == "| CoLA | 2e-05 | pending |"
    _log(grid / "vanilla@lr0.0001" / "seed101", "mcc", [2])
    # x1 2e-5 (held-out 5), x2 4e-5 (1), x5 1e-4 (2): x1 wins; with the family's grid (1e-5 lost to it) it is
    # inside the lrs vanilla tried, so not an edge
    assert own_lr_cell() == "| CoLA | 2e-05 | 2e-05 |"


def test_an_own_lr_control_that_chose_its_familys_lr_is_not_run_again(tmp_path, monkeypatch):
    assert quality.runs_as_base("vanilla_own_lr", {"adam": 1e-4, "vanilla_own_lr": 1e-4}) == "vanilla"
    assert quality.runs_as_base("sage_own_lr", {"adamax": 2e-4, "sage_own_lr": 2e-4}) == "sage"
    assert quality.runs_as_base("vanilla_own_lr", {"adam": 1e-4, "vanilla_own_lr": 2e-4}) is None
    assert quality.runs_as_base("vanilla_own_lr", {"adam": 1e-4, "vanilla_own_lr": None}) is None
    assert quality.runs_as_base("vanilla_dropout0", {"adam": 1e-4}) is None  # adds a flag: always its own runs
    assert quality.runs_as_base("vanilla", {"adam": 1e-4}) is None
    protocol = dict(quality.PROTOCOL, lr_grid={"adam": (1e-5, 2e-5)}, grid_seeds=(101,))
    for lr, v in ((1e-5, 3), (2e-5, 5), (4e-5, 4), (1e-4, 2)):
        _log(tmp_path / "runs" / "grid" / "SST-2" / f"vanilla@lr{lr:g}" / "seed101", "accuracy", [v])
    for seed in (1, 2):
        _log(tmp_path / "runs" / "main" / "SST-2" / "vanilla" / f"seed{seed}", "accuracy", [80 + seed])
    text = quality.write_report(
        tmp_path / "runs", tmp_path / "results", ["SST-2"], ["vanilla", "vanilla_own_lr"], "python run.py", protocol
    )
    assert "| SST-2 | 2e-05 (grid's top) | 2e-05 |" in text  # the family's top, inside the control's candidates
    assert "Vanilla (Adam) at its own lr (control) chose its family's lr: its runs would repeat Vanilla's" in text
    data = tmp_path / "main-bin"
    (data / "label").mkdir(parents=True)
    (data / "label" / "train.label").write_text("1\n" * 1000)
    monkeypatch.setattr(quality, "prepare_data", lambda *a, **k: data)
    pretrained = {"model": tmp_path / "m" / "model.pt", "train_args": []}
    methods = ["vanilla", "vanilla_own_lr"]
    lrs = {"SST-2": {"adam": 2e-5, "vanilla_own_lr": 2e-5}}
    runs = quality.main_runs(tmp_path, tmp_path, tmp_path, ["SST-2"], methods, (1, 2), lrs, pretrained, protocol)
    assert [(r["method"], r["seed"]) for r in runs] == [("vanilla", 1), ("vanilla", 2)]
    lrs["SST-2"]["vanilla_own_lr"] = 4e-5  # x2: a run of its own
    runs = quality.main_runs(tmp_path, tmp_path, tmp_path, ["SST-2"], methods, (1,), lrs, pretrained, protocol)
    assert [(r["method"], r["lr"]) for r in runs] == [("vanilla", 2e-5), ("vanilla_own_lr", 4e-5)]


def test_a_report_that_fails_while_writing_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from robustft_common import atomic_files

    _main_report(tmp_path, "SST-2", "accuracy", {1: {"vanilla": 80, "r3f": 81}})
    results = tmp_path / "results"
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    assert {"results.md", "results.json", "SST-2.png"} <= set(before)

    def crash(src, dst):  # the disk fills up at the rename: nothing may reach the final names
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        _main_report(tmp_path, "SST-2", "accuracy", {2: {"vanilla": 70, "r3f": 90}})
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before  # no temp file left either


def test_a_run_record_appears_whole(tmp_path):
    from robustft_common import atomic_files

    final = tmp_path / "status.json"
    atomic_files.write_text(final, '{"status": "ok"}')

    def half_then_crash(f):
        f.write(b'{"stat')
        raise KeyboardInterrupt  # a study stopped with ^C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_files.write_file(final, half_then_crash)
    assert final.read_text() == '{"status": "ok"}' and [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_results_md_and_json_name_the_same_commit(tmp_path, monkeypatch):
    # the report's own files make the tree dirty once written: asked again later, git would answer otherwise
    answers = iter(["abc1234", "abc1234 (with uncommitted changes)"])
    monkeypatch.setattr(quality, "git_commit", lambda: next(answers, "abc1234 (with uncommitted changes)"))
    lines = _main_report(tmp_path, "SST-2", "accuracy", {1: {"vanilla": 80, "r3f": 81}})
    assert "Commit: abc1234; written" in _line(lines, "Commit:")
    assert json.loads((tmp_path / "results" / "results.json").read_text())["commit"] == "abc1234"


def test_ten_epoch_controls_change_only_the_schedule_and_are_compared_on_it(tmp_path, monkeypatch):
    assert quality.run_protocol("r3f") is quality.PROTOCOL and quality.run_protocol("r3f_10ep")["epochs"] == 10
    for control, base in (("vanilla_10ep", "vanilla"), ("r3f_10ep", "r3f"), ("r4f_10ep", "r4f")):
        assert quality.study_flags(control) == quality.study_flags(base)
    data = tmp_path / "main-bin"
    (data / "label").mkdir(parents=True)
    (data / "label" / "train.label").write_text("1\n" * 1000)
    pretrained = {"model": tmp_path / "m" / "model.pt", "train_args": []}
    monkeypatch.setattr(quality, "prepare_data", lambda *a, **k: data)  # no binarization in this unit test
    lrs = {"SST-2": {"adam": 1e-4}}
    runs = quality.main_runs(
        tmp_path, tmp_path / "runs", tmp_path, ["SST-2"], ["r3f", "r3f_10ep"], [1], lrs, pretrained
    )
    study, longer = (r["cmd"] for r in runs)
    for flag, value in (("--max-epoch", "10"), ("--max-update", "630"), ("--total-num-update", "630")):
        assert longer[longer.index(flag) + 1] == value
    assert longer[longer.index("--warmup-updates") + 1] == "63" and study[study.index("--max-update") + 1] == "189"
    # the same method, lr and seed; only the schedule differs
    assert _without_schedule(longer) == _without_schedule(study)

    methods = ("vanilla", "r3f", "r4f", "vanilla_10ep", "r3f_10ep", "r4f_10ep")
    per_seed = {1: (80, 80, 81, 79, 82, 82), 2: (81, 82, 82, 78, 80, 81), 3: (82, 81, 83, 80, 83, 85)}
    lines = _main_report(tmp_path, "SST-2", "accuracy", {s: dict(zip(methods, v)) for s, v in per_seed.items()})
    # vs vanilla at 10 epochs, not at 3: 3, 2, 3 -> mean 2.67, sd 0.577, half-width 4.3027 * 0.577 / sqrt(3) = 1.43
    assert "+2.67 [+1.23, +4.10], wins 3/3 (vs Vanilla, 10 epochs (control))" in _line(
        lines, "| R3F, 10 epochs (control) |"
    )
    # the reference itself is compared with vanilla at 3 epochs: -1, -3, -2 -> mean -2, sd 1, half-width 2.48
    assert "-2.00 [-4.48, +0.48], wins 0/3 (vs Vanilla)" in _line(lines, "| Vanilla, 10 epochs (control) |")
    # R4F - R3F at 10 epochs: 0, 1, 2 -> mean 1, sd 1
    assert "+1.00 [-1.48, +3.48], wins 2/3" in _line(lines, "| R4F, 10 epochs (control) − R3F, 10 epochs (control) |")
