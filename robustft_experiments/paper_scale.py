"""Paper-scale reproduction of R3F, HyPe and PATS on GPU clusters: one command per paper, our numbers next
to the published ones.

    python benchmarks/quality/paper_scale.py --paper r3f --backbone roberta-large \
        --data-root glue-bin --pretrained roberta.large/model.pt --output-dir repro/r3f

Each paper's table (`PAPERS`: tasks, methods, backbones) is run as (task, method, seed) fine-tuning runs of
`scripts/recipes/glue.sh` in the paper's schedule (fp16 where the paper's recipe has it, `--launcher
torchrun` for several GPUs per run, `--launcher slurm-array` for a SLURM job array). A method whose own recipe
schedule is another paper's (vanilla in the HyPe paper) runs as that paper's baseline twin: the same schedule
(`RECIPE_SCHEDULE`), the method's own flags. Method flags come from the method registry, task flags from the
GLUE task table, via glue.sh; nothing here repeats a flag of a method or a schedule.

Runs live in OUT/runs/<TASK>/<method>/seed<S>/ (`command.json`, `train.log` written by glue.sh,
`status.json`); a run whose status says ok is never redone, so re-running the command resumes it (failed runs
only with --retry-failed). Runs start from the pretrained model each time (glue.sh resets optimizer and data
loader), and save no checkpoints unless --keep-checkpoints: the report reads the dev metric of every
validation from the log.

The report (OUT/paper_scale.md, OUT/paper_scale.json) computes each run's value and the aggregate over seeds
the way the paper did (benchmarks/quality/paper_numbers.json, `convention`): R3F best and median over 10
seeds of each run's best dev validation; HyPe mean over 3 seeds of the last one; PATS mean over 5 seeds. It
prints ours (mean ± std, n, and the paper's aggregate) beside the published number with its source and
verified/unverified status, the difference, and each method's gain over its baseline (ours and the paper's).

Backbones: RoBERTa from fairseq's `roberta.large/model.pt` (data from `python -m glue_preprocess --tokenizer
gpt2` with that model's dict.txt); BERT from a `python -m hf2fairseq` folder (arch hf_bert, BERT's [CLS] A
[SEP] B [SEP] pairs: no --separator-token; data with `--tokenizer wordpiece` and the folder's vocab/dict).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from robustft_common import glue_tasks
from robustft_common import methods as registry
from robustft_common.methods import flag_value, get_method
from robustft_experiments import stats
from robustft_experiments.quality import git_commit
from robustft_experiments.report import parse_valid_records
from robustft_experiments.sweep import REPO, run_status

PAPER_NUMBERS = REPO / "benchmarks" / "quality" / "paper_numbers.json"
GLUE_SH = REPO / "scripts" / "recipes" / "glue.sh"
ENTRY_POINT = REPO / "benchmarks" / "quality" / "paper_scale.py"
LAUNCHERS = ("local", "torchrun", "slurm-array")
SCHEDULES = ("paper", "tiny")


@dataclass(frozen=True)
class Backbone:
    name: str
    converted: bool  # True: a `python -m hf2fairseq` folder (BERT); False: a fairseq RoBERTa model.pt
    arch: str | None  # stock fairseq arch of a RoBERTa model.pt (glue.sh ARCH)
    layers: int  # what the paper's model has: a smaller --pretrained is flagged in the report
    dim: int
    hint: str  # how to get it


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "roberta-large",
            False,
            "roberta_large",
            24,
            1024,
            "fairseq's roberta.large/model.pt (https://dl.fbaipublicfiles.com/fairseq/models/roberta.large.tar.gz)",
        ),
        Backbone(
            "bert-large",
            True,
            None,
            24,
            1024,
            "python -m hf2fairseq --hf-dir bert-large-uncased --output-dir bert-large (HF checkpoint folder)",
        ),
        Backbone(
            "bert-base",
            True,
            None,
            12,
            768,
            "python -m hf2fairseq --hf-dir bert-base-uncased --output-dir bert-base (HF checkpoint folder)",
        ),
    )
}


@dataclass(frozen=True)
class Paper:
    name: str  # key of paper_numbers.json
    title: str
    backbones: tuple[str, ...]
    tasks: tuple[str, ...]  # the paper's table, its column order
    methods: tuple[str, ...]  # registry names, baselines first
    schedule: str  # glue.sh recipe schedule of the paper (a registry recipe's "schedule")
    twin_flags: tuple[str, ...] = ()  # appended for a baseline twin (a method from another schedule)
    caveats: tuple[str, ...] = ()


PAPERS: dict[str, Paper] = {
    p.name: p
    for p in (
        Paper(
            "r3f",
            "R3F / R4F (Aghajanyan et al., ICLR 2021), Table 2: RoBERTa-large, GLUE dev",
            ("roberta-large",),
            ("MNLI", "QQP", "QNLI", "SST-2", "CoLA", "MRPC", "RTE"),
            ("vanilla", "r3f", "r4f"),
            "roberta_glue",
            caveats=(
                "Every task runs the fairseq RoBERTa GLUE schedule of glue.sh (per-task lr / batch / updates, fp16, 10 "
                "epochs); the rxf README's one R3F command (RTE) used lr 1e-5, batch 8, 3120 updates (r3f.md §2.3).",
                "The paper's STD (vanilla) row is RoBERTa's published result, not a run of the R3F authors "
                "(r3f.md §4).",
            ),
        ),
        Paper(
            "hype",
            "HyPe (Yuan et al., ACL 2023), Table 1: GLUE small tasks, dev",
            ("bert-large", "roberta-large"),
            ("CoLA", "MRPC", "RTE", "STS-B"),
            ("vanilla", "hype_n", "hype_u"),
            "hype_readme",
            # vanilla in HyPe's schedule keeps the backbone's dropout 0.1 (hidden and head, as transformers'
            # BERT/RoBERTa classifiers): dropout off is part of HyPe in the registry (hype.md §1.4, §2), and
            # glue.sh's hype_readme schedule switches it off for the methods it was written for
            twin_flags=("--dropout", "0.1", "--pooler-dropout", "0.1"),
            caveats=(
                "HyPe's README truncates inputs to 128 tokens; glue.sh keeps the model's 512.",
                "hype_u is HyPe-U as the paper defines it, U(-eps, eps); the paper's numbers were produced by the "
                "official code's one-sided U[0, eps) (`--methods hype_u_official` runs that one).",
                "Per-task numbers are published for HyPe-N on BERT-large only; the rest are averages over the four "
                "tasks (table below).",
            ),
        ),
        Paper(
            "pats",
            "PATS (Zhang et al., EMNLP 2022): GLUE dev, Adamax, batch 32, 10 epochs",
            ("bert-base", "roberta-large"),
            ("CoLA", "MRPC", "RTE", "STS-B", "QQP", "QNLI", "MNLI", "SST-2"),
            ("vanilla_adamax", "noisytune", "sage", "pats"),
            "pats_adamax",
            caveats=(
                "The paper tuned the lr per task (Table 2, grid 1e-5 ... 5e-4); those values were not recovered: "
                "glue.sh uses 1e-4 for every task unless --lr sets them (e.g. --lr RTE=2e-5,CoLA=1e-5).",
                "fp32, as SAGE's code (pats.md §2: no fp16).",
            ),
        ),
    )
}


# ------------------------------------------------------------------------------------------ published
@dataclass(frozen=True)
class Published:
    source: str
    status: str
    status_note: str
    convention: dict  # seeds, checkpoint ("best" | "last"), aggregates {aggregate: table name}, source, status
    metrics: dict[str, str]  # task -> metric of the paper's number (else the task table's best_metric)
    metrics_source: str
    values: dict[tuple[str, str, str], float]  # (aggregate, task, method) -> number
    averages: tuple[dict, ...]  # over tasks: {"method", "kind": mean_over_tasks | gain_over_baseline, ...}

    def metric(self, task: str) -> str:
        return self.metrics.get(task, glue_tasks.TASKS[task].best_metric)


def load_published(paper: str, backbone: str, path: Path = PAPER_NUMBERS) -> Published:
    """The paper's numbers for one backbone from paper_numbers.json (r3f/hype: `backbone` + `tables` by
    name; pats: `backbones` -> rows of its single table)."""
    entry = json.loads(Path(path).read_text())[paper]
    conv = entry["convention"]
    values = {}
    for aggregate, table in conv["aggregates"].items():
        if "backbones" in entry:
            rows = entry["backbones"].get(backbone, [])
        else:
            rows = entry["tables"].get(table, []) if entry.get("backbone") == backbone else []
        for row in rows:
            values[(aggregate, glue_tasks.canonical_name(row["task"]), row["method"])] = float(row["value"])
    averages = tuple(a for a in entry.get("averages", ()) if a["backbone"] == backbone)
    return Published(
        entry["source"],
        entry["status"],
        entry.get("status_note", ""),
        conv,
        entry.get("metrics", {}),
        entry.get("metrics_source", ""),
        values,
        averages,
    )


# ------------------------------------------------------------------------------------------ model
def model_env(backbone: Backbone, pretrained: Path, arch_args: str | None = None, check: bool = True) -> dict:
    """glue.sh's model env (ROBERTA_PATH, ARCH or ARCH_ARGS, SEPARATOR_TOKEN) and what the report says of it."""
    pretrained = Path(pretrained).resolve()
    meta_file = pretrained / "convert.json"
    if backbone.converted:
        if not meta_file.is_file():
            raise SystemExit(
                f"--pretrained {pretrained}: {backbone.name} needs a folder written by hf2fairseq "
                f"(model.pt + convert.json), e.g. {backbone.hint}"
            )
        meta = json.loads(meta_file.read_text())
        hf = meta.get("hf_config", {})
        env = {
            "ROBERTA_PATH": str(pretrained / "model.pt"),
            "ARCH_ARGS": shlex.join(meta["train_args"]),
            # BERT's [CLS] A [SEP] B [SEP]: the </s> fairseq appends is [SEP] (convert.json input_layout)
            "SEPARATOR_TOKEN": "none",
        }
        shape = (hf.get("num_hidden_layers"), hf.get("hidden_size"))
    else:
        model = pretrained / "model.pt" if pretrained.is_dir() else pretrained
        if pretrained.is_dir() and meta_file.exists():
            raise SystemExit(
                f"--pretrained {pretrained}: {backbone.name} takes {backbone.hint}, not an hf2fairseq "
                f"folder (those are for the BERT backbones)"
            )
        if check and not model.is_file():
            raise SystemExit(f"--pretrained {pretrained}: no such model.pt; {backbone.name}: {backbone.hint}")
        env = {"ROBERTA_PATH": str(model), "ARCH": str(backbone.arch), "SEPARATOR_TOKEN": "2"}
        shape = (backbone.layers, backbone.dim)
    if arch_args:
        env["ARCH_ARGS"] = arch_args
        shape = (
            flag_value(shlex.split(arch_args), "--encoder-layers"),
            flag_value(shlex.split(arch_args), "--encoder-embed-dim"),
        )
    layers, dim = (int(x) if x is not None else None for x in shape)
    return {"env": env, "layers": layers, "dim": dim, "paper_size": (layers, dim) == (backbone.layers, backbone.dim)}


# ------------------------------------------------------------------------------------------ plan
def parse_lr(text: str | None, tasks: Sequence[str]) -> dict[str, str]:
    """--lr: one value for every task, or TASK=LR pairs; {} = glue.sh's (the paper's) lr."""
    if not text:
        return {}
    if "=" not in text:
        float(text)  # ValueError names the value
        return {t: text for t in tasks}
    out = {}
    for item in text.split(","):
        task, _, lr = item.partition("=")
        try:
            float(lr)
            out[glue_tasks.canonical_name(task, "--lr")] = lr
        except ValueError as err:
            raise SystemExit(f"--lr: {item!r}: {err}; give LR or TASK=LR,TASK=LR (e.g. RTE=2e-5,CoLA=1e-5)") from None
    return out


def _subset(text: str | None, default: Sequence[str], flag: str, canon=lambda x: x, allowed=None) -> list[str]:
    """The comma list `text` (each in `allowed`, default `default`), or `default`."""
    allowed = list(allowed or default)
    if not text:
        return list(default)
    picked = [canon(x) for x in text.split(",") if x]
    bad = [x for x in picked if x not in allowed]
    if bad:
        raise SystemExit(f"{flag}: {', '.join(bad)} not in this paper's table; choose from {', '.join(allowed)}")
    return picked


def method_text(method: str) -> str:
    """`python -m robustft_common.methods bash METHOD` (glue.sh's METHOD_TEXT), without a Python start."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if registry.main(["bash", method]) != 0:
            raise SystemExit(f"--methods: unknown method {method!r}")
    return out.getvalue()


def glue_sh_flags(env: Mapping[str, str], task: str, method: str, seed: int) -> list[str]:
    """The fairseq-train arguments glue.sh runs for one (task, method, seed) (its DRY_RUN)."""
    proc = subprocess.run(
        ["bash", str(GLUE_SH), task, method, str(seed)],
        env={**os.environ, **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{GLUE_SH} {task} {method} {seed} failed ({proc.returncode}): {proc.stderr.strip()}")
    return shlex.split(proc.stdout)


def plan(args) -> list[dict]:
    """Every (task, method, seed) run of the paper's table: task-, then seed-major (partial results stay paired)."""
    paper, backbone = PAPERS[args.paper], BACKBONES[args.backbone]
    published = load_published(paper.name, backbone.name)
    tasks = _subset(args.tasks, paper.tasks, "--tasks", lambda t: glue_tasks.canonical_name(t))
    methods = _subset(args.methods, paper.methods, "--methods", allowed=paper.methods + _extra_methods(paper))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(1, published.convention["seeds"] + 1))
    model = model_env(backbone, args.pretrained, args.arch_args, check=not args.dry_run)
    lrs = parse_lr(args.lr, tasks)
    out = Path(args.output_dir).resolve()
    base = {
        **model["env"],
        "DATA_ROOT": str(Path(args.data_root).resolve()),
        "SAVE_ROOT": str(out / "runs"),
        "PY": sys.executable,
        "SCHEDULE": args.schedule,
        "TINY_UPDATES": str(args.tiny_updates),
        "NGPUS": str(args.ngpus if args.launcher != "local" else 1),
    }
    runs = []
    for task in tasks:
        task_text = shlex.join(glue_tasks.resolve_task(task).train_flags())
        for seed in seeds:
            for method in methods:
                spec = get_method(method)
                env = {**base, "TASK_FLAGS_TEXT": task_text, "METHOD_TEXT": method_text(method)}
                extra: list[str] = []
                twin = spec.recipe.get("schedule") != paper.schedule
                if twin:  # a baseline from another paper's schedule runs in this paper's
                    env["RECIPE_SCHEDULE"] = paper.schedule
                    extra += paper.twin_flags
                if task in lrs:
                    env["LR"] = lrs[task]
                if not args.keep_checkpoints:
                    extra.append("--no-save")  # the report reads the log; roberta-large checkpoints are 1.4 GB each
                env["EXTRA"] = " ".join(extra)
                flags = glue_sh_flags(env, task, method, seed)
                if int(base["NGPUS"]) > 1:  # fairseq's --batch-size is per GPU: keep the paper's total batch
                    batch_text = flag_value(flags, "--batch-size")
                    assert batch_text is not None, "glue.sh always sets --batch-size"
                    batch = int(batch_text)
                    if batch % int(base["NGPUS"]):
                        raise SystemExit(
                            f"--ngpus {base['NGPUS']}: {task}/{method} trains with batch {batch}, which "
                            f"{base['NGPUS']} GPUs cannot share evenly; use a divisor of {batch}"
                        )
                    env["EXTRA"] = " ".join(extra + ["--batch-size", str(batch // int(base["NGPUS"]))])
                    flags = glue_sh_flags(env, task, method, seed)
                runs.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "twin": twin,
                        "dir": out / "runs" / task / method / f"seed{seed}",
                        "env": env,
                        "cmd": ["bash", str(GLUE_SH), task, method, str(seed)],
                        "flags": flags,
                    }
                )
    return runs


def _extra_methods(paper: Paper) -> tuple[str, ...]:
    """Registry methods a user may add to a paper's table (same schedule family), e.g. hype_u_official."""
    return tuple(
        m
        for m, spec in registry.METHODS.items()
        if m not in paper.methods and spec.recipe.get("schedule") == paper.schedule
    )


# ------------------------------------------------------------------------------------------ run
def shown_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env of a run as a user would type it (the two table texts are glue.sh's own look-ups)."""
    return {k: v for k, v in env.items() if k not in ("TASK_FLAGS_TEXT", "METHOD_TEXT") and v != ""}


def execute(run: dict, echo: bool = True) -> str:
    """Run glue.sh for one run (it tees fairseq's output to train.log there); record command.json, status.json."""
    run_dir = Path(run["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").unlink(missing_ok=True)
    (run_dir / "command.json").write_text(
        json.dumps(
            {k: run[k] for k in ("task", "method", "seed", "twin", "cmd")}
            | {"env": shown_env(run["env"]), "fairseq_train_args": run["flags"]},
            indent=1,
        )
    )
    start = time.time()
    with open(run_dir / "glue_sh.stderr", "w") as err:
        proc = subprocess.run(
            run["cmd"],
            env={**os.environ, **run["env"], "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
            stdout=None if echo else subprocess.DEVNULL,
            stderr=err,
        )
    status = "ok" if proc.returncode == 0 else "failed"
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(
        json.dumps({"status": status, "returncode": proc.returncode, "seconds": round(time.time() - start, 1)})
    )
    tmp.replace(run_dir / "status.json")
    return status


def check_output_dir(out: Path, meta: dict) -> None:
    """One paper, backbone and schedule per output folder: a second would mix its runs into the first's report."""
    path = out / "paper_scale.json"
    if path.exists():
        old = json.loads(path.read_text()).get("setup", {})
        clash = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) not in (None, v)}
        if clash:
            raise SystemExit(
                f"--output-dir {out} holds runs of {old}; this command has {meta} ({clash}): use another --output-dir"
            )


def write_setup(out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "paper_scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["setup"] = meta
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # job-array tasks write it at once: never a torn file
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def job_command(args, index: int | None = None, report_only: bool = False) -> list[str]:
    """This command for one run of a job array (or for the report), with absolute paths."""
    cmd = [
        sys.executable,
        str(ENTRY_POINT),
        "--paper",
        args.paper,
        "--backbone",
        args.backbone,
        "--output-dir",
        str(Path(args.output_dir).resolve()),
    ]
    if report_only:
        return cmd + ["--report-only"]
    cmd += [
        "--data-root",
        str(Path(args.data_root).resolve()),
        "--pretrained",
        str(Path(args.pretrained).resolve()),
        "--schedule",
        args.schedule,
        "--launcher",
        "torchrun" if args.ngpus > 1 else "local",
        "--ngpus",
        str(args.ngpus),
    ]
    for flag, value in (
        ("--tasks", args.tasks),
        ("--methods", args.methods),
        ("--seeds", args.seeds),
        ("--lr", args.lr),
        ("--arch-args", args.arch_args),
    ):
        if value:
            cmd += [flag, value]
    if args.schedule == "tiny":
        cmd += ["--tiny-updates", str(args.tiny_updates)]
    for switch in ("keep_checkpoints", "retry_failed"):
        if getattr(args, switch):
            cmd.append("--" + switch.replace("_", "-"))
    return cmd + ["--only-run", str(index), "--no-report"]


def write_slurm_array(args, runs: Sequence[dict]) -> Path:
    """OUT/jobs.txt (one command per run), OUT/paper_scale.sbatch (the array) and OUT/submit.sh (the array,
    then the report once every array task has ended)."""
    out = Path(args.output_dir).resolve()
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    jobs = out / "jobs.txt"
    jobs.write_text("".join(shlex.join(job_command(args, i)) + "\n" for i in range(len(runs))))
    sbatch = out / "paper_scale.sbatch"
    sbatch.write_text(f"""#!/usr/bin/env bash
# Paper-scale reproduction, {args.paper} / {args.backbone}: array task i runs line i+1 of jobs.txt (one
# (task, method, seed) run; finished runs are skipped). Submit with submit.sh next to this file.
#SBATCH --job-name=ps-{args.paper}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node={args.ngpus}
#SBATCH --cpus-per-task={max(4, 4 * args.ngpus)}
#SBATCH --time=24:00:00
#SBATCH --output={out}/slurm/%A_%a.out
set -euo pipefail
cd {shlex.quote(str(REPO))}
eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(jobs))})"
""")
    submit = out / "submit.sh"
    report_cmd = shlex.quote(shlex.join(job_command(args, report_only=True)))
    submit.write_text(f"""#!/usr/bin/env bash
# sbatch the run array (extra sbatch options, e.g. --partition=gpu, go to both jobs), then the report
# after every array task has ended (afterany: a failed run is reported as failed, never dropped).
set -euo pipefail
ARRAY=$(sbatch --parsable "$@" {shlex.quote(str(sbatch))})
sbatch --parsable "$@" --dependency=afterany:"${{ARRAY%%;*}}" --job-name=ps-{args.paper}-report --ntasks=1 \\
  --time=00:30:00 --output={out}/slurm/report-%j.out --wrap {report_cmd}
echo "submitted the run array $ARRAY ({len(runs)} runs) and its report"
""")
    submit.chmod(0o755)
    return submit


# ------------------------------------------------------------------------------------------ report
def run_value(run_dir: Path, metric: str, checkpoint: str) -> dict:
    """status, best / last validation of `metric` and the value the paper's convention takes."""
    status = run_status(run_dir) or "incomplete"
    log = Path(run_dir) / "train.log"
    values = []
    if log.exists():
        values = [
            r[metric]
            for r in parse_valid_records(log.read_text(errors="replace"))
            if metric in r and math.isfinite(r[metric])
        ]
    row = {
        "status": status,
        "best": max(values) if values else None,
        "last": values[-1] if values else None,
        "validations": len(values),
    }
    if status == "ok" and not values:
        row["status"] = "failed"  # finished without a single validation of the metric: nothing to report
    row["value"] = row[checkpoint] if row["status"] == "ok" else None
    return row


AGGREGATES: dict[str, Callable[[list[float]], float]] = {
    "best": max,
    "median": statistics.median,
    "mean": statistics.fmean,
}


def collect(out: Path, published: Published, tasks, methods, seeds=None) -> list[dict]:
    """One row per run folder OUT/runs/<TASK>/<method>/seed<S> of the table's tasks and methods."""
    rows = []
    for task in tasks:
        metric = published.metric(task)
        for method in methods:
            dirs = sorted((Path(out) / "runs" / task / method).glob("seed*"), key=lambda p: int(p.name[4:]))
            for run_dir in dirs:
                seed = int(run_dir.name[4:])
                if seeds is not None and seed not in seeds:
                    continue
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "metric": metric,
                        **run_value(run_dir, metric, published.convention["checkpoint"]),
                    }
                )
    return rows


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def cells(rows: Sequence[dict], published: Published) -> dict[tuple[str, str], dict]:
    """Per (task, method): the seeds' values, summary, the paper's aggregates of ours, failures."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault((r["task"], r["method"]), {"values": {}, "failed": 0, "incomplete": 0})
        if r["value"] is not None:
            cell["values"][r["seed"]] = r["value"]
        elif r["status"] == "failed":
            cell["failed"] += 1
        else:
            cell["incomplete"] += 1
    for cell in out.values():
        vals = list(cell["values"].values())
        cell["summary"] = stats.summarize(vals)
        cell["ours"] = {a: (AGGREGATES[a](vals) if vals else None) for a in published.convention["aggregates"]}
    return out


EMPTY_CELL = {"values": {}, "failed": 0, "incomplete": 0, "summary": stats.summarize([]), "ours": {}}
CHECKPOINT_TEXT = {"best": "best dev validation (best checkpoint)", "last": "last dev validation (last checkpoint)"}


def header_lines(paper: Paper, backbone: str, published: Published, setup: dict, command: str) -> list[str]:
    """What was run, on what, and how ours and the paper's numbers are computed."""
    conv = published.convention
    lines = [f"# Paper-scale reproduction: {paper.title}; {backbone}", "", f"Command: `{command}`  "]
    if setup:
        lines.append(
            f"Runs: commit {setup.get('commit')}, schedule {setup.get('schedule')}, pretrained "
            f"`{setup.get('pretrained')}` ({setup.get('layers')} layers, dim {setup.get('dim')}); report "
            f"written {datetime.date.today().isoformat()}.  "
        )
    else:
        lines.append(
            "Runs: their setup is not recorded (no `setup` in paper_scale.json: not started by this driver).  "
        )
    reasons = (
        ["the tiny schedule (a few CPU updates of the paper's flags)"] if setup.get("schedule") == "tiny" else []
    ) + (["a model of another size than the paper's"] if not setup.get("paper_size", True) else [])
    if reasons:
        lines.append(
            f"**Not a reproduction:** {' and '.join(reasons)}: a check of the pipeline; the numbers below "
            "say nothing about the methods.  "
        )
    return lines + [
        f"Ours: per run the {CHECKPOINT_TEXT[conv['checkpoint']]} of the task's metric; over seeds mean ± sample std "
        f"(n = finished runs) and the paper's aggregate ({', '.join(conv['aggregates'])}). Paper convention "
        f"({conv.get('status', '?')}): {conv['seeds']} seeds; {conv['source']}.  ",
        f"Published numbers: {published.source}; status: **{published.status}**"
        + (f" ({published.status_note})" if published.status_note else "")
        + ".  ",
        "Gain: a method minus its baseline (method registry) in the paper's aggregate, ours and the paper's; "
        "paired: the mean per-seed difference (same seed = same data order and head init) with a 95 % t "
        "interval and wins / seeds.",
        "",
    ]


def table_row(published: Published, by: dict, task: str, method: str, methods) -> list[str]:
    """One (task, method) row: ours, the paper's aggregate(s) and the difference, the gain over the baseline."""
    aggregates = list(published.convention["aggregates"])
    cell = by.get((task, method), EMPTY_CELL)
    ours = {a: cell["ours"].get(a) for a in aggregates}
    text = cell["summary"].text() + (f", {cell['failed']} failed" if cell["failed"] else "")
    line = [f"{task} ({published.metric(task)})", get_method(method).label, text]
    for a in aggregates:  # "mean" is in "mean ± std" already
        paper_value = published.values.get((a, task, method))
        line += ([_fmt(ours[a])] if a != "mean" else []) + [_fmt(paper_value), _fmt(_diff(ours[a], paper_value), True)]
    base, first = get_method(method).baseline, aggregates[0]
    if base is None:
        return line + ["baseline", ""]
    if base not in methods:
        return line + [f"({get_method(base).label} not run)", "–"]
    bcell = by.get((task, base), EMPTY_CELL)
    ours_gain = _diff(ours[first], bcell["ours"].get(first))
    paper_gain = _diff(published.values.get((first, task, method)), published.values.get((first, task, base)))
    return line + [
        f"{_fmt(ours_gain, True)} / {_fmt(paper_gain, True)}",
        stats.paired(cell["values"], bcell["values"]).text(),
    ]


def markdown(
    paper: Paper, backbone: str, published: Published, rows: Sequence[dict], tasks, methods, setup: dict, command: str
) -> str:
    aggregates = list(published.convention["aggregates"])
    by = cells(rows, published)
    head = ["task (metric)", "method", "ours: mean ± std (n)"]
    for a in aggregates:
        head += ([f"ours {a}"] if a != "mean" else []) + [f"paper {a}", "ours − paper"]
    head += [f"gain ({aggregates[0]}): ours / paper", "paired gain [95 % CI], wins"]
    lines = header_lines(paper, backbone, published, setup, command)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_row(published, by, t, m, methods)) + " |" for t in tasks for m in methods]
    lines += averages_table(published, by, paper.tasks, methods, aggregates[0])
    lines += ["", "Notes:", ""] + [f"- {c}" for c in paper.caveats]
    if published.metrics:
        lines.append(
            "- Metrics other than the GLUE task table's best_metric: "
            + ", ".join(f"{t} {m}" for t, m in published.metrics.items())
            + f" ({published.metrics_source})."
        )
    return "\n".join(lines) + "\n"


def averages_table(published: Published, by: dict, tasks, methods, aggregate: str) -> list[str]:
    """The paper's averages over its tasks (HyPe) against ours: the mean over the same tasks of our per-task
    aggregate, only when every one of them has a value."""
    if not published.averages:
        return []
    lines = [
        "",
        f"Averages over {', '.join(tasks)} (ours: mean over tasks of the per-task {aggregate}):",
        "",
        "| method | quantity | ours | paper | ours − paper | paper status and source |",
        "|---|---|---|---|---|---|",
    ]

    def task_mean(method):
        vals = [by.get((t, method), {}).get("ours", {}).get(aggregate) for t in tasks]
        return None if not vals or any(v is None for v in vals) else statistics.fmean(vals)

    for avg in published.averages:
        method = avg["method"]
        if method not in methods:
            continue
        ours = task_mean(method)
        quantity = "average"
        if avg["kind"] == "gain_over_baseline":
            base = get_method(method).baseline
            assert base is not None, f"{method} has a gain over its baseline, so it has one"
            ours = _diff(ours, task_mean(base))
            quantity = f"average gain over {get_method(base).label}"
        lines.append(
            f"| {get_method(method).label} | {quantity} | {_fmt(ours, avg['kind'] != 'mean_over_tasks')} | "
            f"{_fmt(avg['value'], avg['kind'] != 'mean_over_tasks')} | {_fmt(_diff(ours, avg['value']), True)} | "
            f"{avg['status']}: {avg['source']} |"
        )
    return lines


def write_report(
    out: Path, paper_name: str, backbone: str, tasks=None, methods=None, seeds=None, command: str = ""
) -> str:
    """OUT/paper_scale.md and the results in OUT/paper_scale.json; returns the markdown."""
    out = Path(out)
    paper = PAPERS[paper_name]
    published = load_published(paper_name, backbone)
    path = out / "paper_scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    setup = data.get("setup", {})
    tasks = list(tasks or paper.tasks)
    found = {p.name for t in tasks for p in (out / "runs" / t).glob("*") if p.is_dir()}
    methods = list(methods or (list(paper.methods) + [m for m in _extra_methods(paper) if m in found]))
    rows = collect(out, published, tasks, methods, seeds)
    text = markdown(paper, backbone, published, rows, tasks, methods, setup, command or setup.get("command", ""))
    by = cells(rows, published)
    data.update(
        {
            "paper": paper_name,
            "backbone": backbone,
            "runs": rows,
            "summary": [
                {
                    "task": t,
                    "method": m,
                    "n": c["summary"].n,
                    "mean": c["summary"].mean,
                    "std": c["summary"].std,
                    "ours": c["ours"],
                    "failed": c["failed"],
                    "incomplete": c["incomplete"],
                    "paper": {a: published.values.get((a, t, m)) for a in published.convention["aggregates"]},
                }
                for (t, m), c in sorted(by.items())
            ],
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("paper_scale.md", text), ("paper_scale.json", json.dumps(data, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(out / name)
    return text


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", required=True, choices=sorted(PAPERS))
    p.add_argument(
        "--backbone",
        required=True,
        choices=sorted(BACKBONES),
        help="the paper's backbones: " + "; ".join(f"{k}: {', '.join(v.backbones)}" for k, v in PAPERS.items()),
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--data-root", type=Path, help="folder with <TASK>-bin/ from glue_preprocess (the backbone's vocab)")
    p.add_argument(
        "--pretrained",
        type=Path,
        help="RoBERTa: fairseq's roberta.large/model.pt; BERT: a `python -m hf2fairseq` folder",
    )
    p.add_argument("--tasks", help="a subset of the paper's tasks (comma list; default: all)")
    p.add_argument("--methods", help="a subset of the paper's methods (default: all, baselines included)")
    p.add_argument("--seeds", help="comma list (default: 1..the paper's number of seeds)")
    p.add_argument("--lr", help="LR for every task or TASK=LR,... (default: glue.sh's, the paper's)")
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: one process per run; torchrun: --ngpus GPUs per run on this node; slurm-array: "
        "write OUT/jobs.txt, paper_scale.sbatch and submit.sh instead of running",
    )
    p.add_argument(
        "--ngpus",
        type=int,
        default=1,
        help="GPUs per run (torchrun, slurm-array); the paper's total batch is split over them",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="paper",
        help="tiny: glue.sh's flags on CPU without fp16 for --tiny-updates updates (a pipeline check)",
    )
    p.add_argument("--tiny-updates", type=int, default=4)
    p.add_argument("--arch-args", help="architecture flags replacing the backbone's (a smaller checkpoint, tests)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint_best/last.pt of every run")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their fairseq flags, run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    p.add_argument("--only-run", type=int, help="run only this run (0-based plan index; job arrays)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not echo fairseq's output (it is in train.log)")
    return p


def check_args(args) -> None:
    paper = PAPERS[args.paper]
    if args.backbone not in paper.backbones:
        raise SystemExit(f"--backbone {args.backbone}: the {args.paper} paper used {', '.join(paper.backbones)}")
    if args.report_only:
        return
    for flag in ("data_root", "pretrained"):
        if getattr(args, flag) is None:
            raise SystemExit(f"--{flag.replace('_', '-')} is required (except with --report-only)")
    if args.ngpus < 1 or (args.launcher == "local" and args.ngpus != 1):
        raise SystemExit(
            f"--ngpus must be >= 1 and is 1 with --launcher local (got {args.ngpus}); several GPUs "
            f"per run: --launcher torchrun or slurm-array"
        )
    if args.tiny_updates < 1:
        raise SystemExit(f"--tiny-updates must be >= 1, got {args.tiny_updates}")


def print_plan(runs: Sequence[dict]) -> None:
    """--dry-run: each run's glue.sh command and the fairseq-train flags it resolves to."""
    for i, run in enumerate(runs):
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in shown_env(run["env"]).items())
        print(
            f"# [{i}] {run['task']}/{run['method']}/seed{run['seed']}"
            + (" (baseline twin in this paper's schedule)" if run["twin"] else "")
            + f"\n{env} {shlex.join(run['cmd'])}\n#   fairseq-train {shlex.join(run['flags'])}"
        )


def run_all(runs: Sequence[dict], retry_failed: bool, quiet: bool) -> int:
    """Run what is not finished (restartable); the number of failed runs."""
    failed = 0
    for i, run in enumerate(runs):
        tag = f"{run['task']}/{run['method']}/seed{run['seed']}"
        status = run_status(run["dir"])
        if status == "ok" or (status == "failed" and not retry_failed):
            print(f"[paper_scale] {tag}: {status}, skipped (restartable)", flush=True)
        else:
            print(f"[paper_scale] ({i + 1}/{len(runs)}) {tag}: glue.sh ...", flush=True)
            status = execute(run, echo=not quiet)
            print(f"[paper_scale] {tag}: {status}", flush=True)
        failed += status == "failed"
    return failed


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    command = "python benchmarks/quality/paper_scale.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.output_dir).resolve()
    report_args = dict(
        tasks=[glue_tasks.canonical_name(t) for t in args.tasks.split(",")] if args.tasks else None,
        methods=args.methods.split(",") if args.methods else None,
        seeds={int(s) for s in args.seeds.split(",")} if args.seeds else None,
    )
    if args.report_only:
        print(write_report(out, args.paper, args.backbone, command=command, **report_args))
        return 0
    runs = plan(args)
    if args.dry_run:
        print_plan(runs)
        return 0
    model = model_env(BACKBONES[args.backbone], args.pretrained, args.arch_args)
    setup = {"paper": args.paper, "backbone": args.backbone, "schedule": args.schedule}
    check_output_dir(out, setup)
    missing = sorted({r["task"] for r in runs if not (Path(args.data_root) / f"{r['task']}-bin").is_dir()})
    if missing:
        raise SystemExit(
            f"--data-root {args.data_root}: no {', '.join(t + '-bin' for t in missing)}; binarize them "
            f"with `python -m glue_preprocess` (docs/recipes.md, 'Paper-scale reproduction')"
        )
    write_setup(
        out,
        {
            **setup,
            "pretrained": str(Path(args.pretrained).resolve()),
            "layers": model["layers"],
            "dim": model["dim"],
            "paper_size": model["paper_size"],
            "commit": git_commit(),
            "command": command,
        },
    )
    if args.launcher == "slurm-array":
        submit = write_slurm_array(args, runs)
        print(f"wrote {out / 'jobs.txt'} ({len(runs)} runs), {out / 'paper_scale.sbatch'}; submit: bash {submit}")
        return 0
    if args.only_run is not None and not 0 <= args.only_run < len(runs):
        raise SystemExit(f"--only-run must be in [0, {len(runs) - 1}], got {args.only_run}")
    failed = run_all([runs[args.only_run]] if args.only_run is not None else runs, args.retry_failed, args.quiet)
    if not args.no_report:
        print(write_report(out, args.paper, args.backbone, command=command, **report_args))
    return 1 if failed else 0
