"""Sweep GLUE tasks x methods x seeds with fairseq-train, restartably, then write the report.

    python scripts/sweep.py --data-root DATA --pretrained CONVERTED --tasks RTE,MRPC \
        --methods vanilla,r3f,hype_u,pats,hype_r3f --seeds 1,2,3 --output-dir sweeps/minilm

DATA holds `<TASK>-bin/` folders from `python -m glue_preprocess`; CONVERTED is a folder written by
`python -m hf2fairseq` (model.pt + convert.json). Each run lives in `OUT/runs/<TASK>/<method>/seed<S>/`
(`command.json`, `train.log`, `status.json`). A run whose status.json says "ok" is never redone, so
re-running the same command resumes the sweep; failed runs are retried only with --retry-failed.
`--emit-jobs FILE` writes one shell command per run instead (for a job array: `--only-run I`).
Paths (`--data-root`, `--output-dir`, `--pretrained`, `--emit-jobs`) are taken relative to the directory
the sweep is started from, and the runs and emitted commands carry them as absolute paths.
At the end the report (`scripts/report.py OUT`) writes results.csv/json, results.md and results.png.
Method flags come from the method registry (`robustft_common.methods`), task flags from the GLUE task
table (`robustft_common.glue_tasks`); the schedule (lr, batch, updates) from the options below.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from robustft_common import atomic_files, glue_tasks
from robustft_common.methods import METHODS, get_method, method_flags
from robustft_experiments.report import canonical_task, write_report

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = REPO / "scripts" / "sweep.py"  # what --emit-jobs lines run
DEFAULT_METHODS = "vanilla,r3f,hype_u,pats,hype_r3f"


def task_flags(task: str) -> list[str]:
    """--num-classes, regression, metric reporting and best-checkpoint selection for one GLUE task."""
    return glue_tasks.resolve_task(task).train_flags()


def run_args(task, method, seed, data_root: Path, run_dir: Path, pretrained: dict | None, args) -> list[str]:
    """The full fairseq-train argument list of one run (data, model, task, method, schedule)."""
    try:
        spec = get_method(method)
    except ValueError as err:
        raise SystemExit(f"--methods: {err}") from None
    lr = args.lr_adamax if spec.optimizer_family == "adamax" and args.lr_adamax else args.lr
    data = Path(data_root) / f"{task}-bin"
    model = []
    if pretrained is not None:
        model = [
            *pretrained["train_args"],
            "--restore-file",
            str(pretrained["model"]),
            "--reset-optimizer",
            "--reset-dataloader",
            "--reset-meters",
            "--reset-lr-scheduler",
        ]
    warmup = max(1, int(round(args.warmup_ratio * args.max_update)))
    cmd = [
        str(data),
        "--user-dir",
        str(REPO / "robustft"),
        "--task",
        "sentence_prediction",
        "--init-token",
        "0",
        *(["--separator-token", "2"] if args.separator_token else []),
        "--shorten-method",
        "truncate",
        *model,
        *task_flags(task),
        *method_flags(method),
        "--lr",
        str(lr),
        "--batch-size",
        str(args.batch_size),
        "--required-batch-size-multiple",
        "1",
        "--max-update",
        str(args.max_update),
        "--max-epoch",
        str(args.max_epoch),
        "--lr-scheduler",
        "polynomial_decay",
        "--total-num-update",
        str(args.max_update),
        "--warmup-updates",
        str(warmup),
        "--clip-norm",
        "0.0",
        "--seed",
        str(seed),
        "--save-dir",
        str(run_dir / "checkpoints"),
        "--log-format",
        "simple",
        "--log-interval",
        str(args.log_interval),
        "--num-workers",
        "0",
        "--ddp-backend",
        "legacy_ddp",
    ]
    if args.validate_interval_updates:
        cmd += ["--validate-interval-updates", str(args.validate_interval_updates)]
    if args.save_checkpoints:
        cmd += ["--no-epoch-checkpoints", "--no-last-checkpoints"]
    else:
        cmd += ["--no-save"]
    if args.cpu:
        cmd.append("--cpu")
    return cmd + shlex.split(args.extra_args or "")


def absolute_path(text: str) -> Path:
    """A path flag, relative to the caller's working directory (argparse `type`)."""
    return Path(text).expanduser().absolute()


PATH_FLAGS = ("--data-root", "--output-dir", "--pretrained")


def absolute_argv(argv: list[str]) -> list[str]:
    """argv with the values of PATH_FLAGS made absolute and --emit-jobs dropped (the lines of a job file)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        takes_value = not eq and i + 1 < len(argv)
        if flag == "--emit-jobs":
            i += 1 if eq else 2
            continue
        if flag in PATH_FLAGS:
            value = value if eq else (argv[i + 1] if takes_value else "")
            out += [flag, str(absolute_path(value))]
            i += 1 if eq else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def trainer_command(args) -> list[str]:
    """scripts/fairseq_train.py (fairseq-train + the hf_bert model) under this Python."""
    return [sys.executable, str(REPO / "scripts" / "fairseq_train.py")]


def load_pretrained(path: Path | None) -> dict | None:
    if path is None:
        return None
    meta_file = Path(path) / "convert.json"
    if not meta_file.exists():
        raise SystemExit(f"--pretrained {path}: no convert.json (convert the model with `python -m hf2fairseq`)")
    meta = json.loads(meta_file.read_text())
    return {"train_args": meta["train_args"], "model": Path(path).resolve() / "model.pt"}


def plan_tasks(args) -> list[str]:
    return [canonical_task(t) for t in args.tasks.split(",") if t]


def check_data(args) -> None:
    """Every task's binarized folder is there before the first fairseq-train starts."""
    for task in plan_tasks(args):
        folder = Path(args.data_root) / f"{task}-bin"
        if not (folder / "input0" / "dict.txt").is_file():
            raise SystemExit(
                f"--data-root {args.data_root}: no {task}-bin/input0/dict.txt. Binarize the task into that "
                f"folder first: python -m glue_preprocess --glue-dir GLUE_DIR --tasks {task} "
                f"--output-dir {args.data_root} ... (glue_preprocess/README.md)"
            )


def plan(args) -> list[dict]:
    """Every (task, method, seed) of the sweep, in a fixed order."""
    pretrained = load_pretrained(args.pretrained)
    runs = []
    for task in plan_tasks(args):
        for method in [m for m in args.methods.split(",") if m]:
            for seed in [int(s) for s in str(args.seeds).split(",") if s]:
                run_dir = Path(args.output_dir) / "runs" / task / method / f"seed{seed}"
                cmd = trainer_command(args) + run_args(task, method, seed, args.data_root, run_dir, pretrained, args)
                runs.append({"task": task, "method": method, "seed": seed, "dir": run_dir, "cmd": cmd})
    return runs


def run_status(run_dir: Path) -> str | None:
    f = Path(run_dir) / "status.json"
    return json.loads(f.read_text()).get("status") if f.exists() else None


def execute(run: dict, echo: bool = True, threads: str | None = None) -> str:
    """Run one fairseq-train, tee its output to train.log (and the console), record status.json."""
    run_dir = Path(run["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").unlink(missing_ok=True)
    atomic_files.write_text(
        run_dir / "command.json",
        json.dumps({k: run[k] for k in ("task", "method", "seed")} | {"cmd": [str(c) for c in run["cmd"]]}, indent=1),
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = threads
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(
            [str(c) for c in run["cmd"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log.write(line)
            log.flush()  # `tail -f train.log` while it runs
            if echo:
                sys.stdout.write(f"[{run['task']}/{run['method']}/s{run['seed']}] {line}")
                sys.stdout.flush()
        rc = proc.wait()
    status = "ok" if rc == 0 else "failed"
    atomic_files.write_text(  # whole or absent: a restarted study reads it to skip finished runs
        run_dir / "status.json",
        json.dumps({"status": status, "returncode": rc, "seconds": round(time.time() - start, 1)}),
    )
    return status


def last_error_line(log_text: str) -> str:
    """The line of a failed run's log that says what went wrong: the last `...Error: ...` / `error:` line
    (a Python exception, an argparse error), else the last non-empty line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line) or " error: " in line:
            return line
    return lines[-1] if lines else "(empty log)"


def failure_report(run: dict) -> str:
    """Where a failed run's log is and its last error line (printed even with --quiet)."""
    log = Path(run["dir"]) / "train.log"
    status = json.loads((Path(run["dir"]) / "status.json").read_text())
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"exit code {status.get('returncode')}, log {log}\n        {last_error_line(text)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-root", type=absolute_path, required=True, help="folder with <TASK>-bin/ from glue_preprocess"
    )
    p.add_argument("--output-dir", type=absolute_path, required=True)
    p.add_argument("--pretrained", type=absolute_path, help="converted model folder (model.pt + convert.json)")
    p.add_argument("--tasks", default="RTE")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"from the method registry: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="1")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--lr-adamax", type=float, help="lr of the adamax-family methods (default: --lr)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-update", type=int, default=100)
    p.add_argument("--max-epoch", type=int, default=0, help="0 = bounded by --max-update only")
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--validate-interval-updates", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument(
        "--separator-token",
        action="store_true",
        help="RoBERTa pair layout <s> A </s></s> B </s> (default: BERT's [CLS] A [SEP] B [SEP])",
    )
    p.add_argument("--save-checkpoints", action="store_true", help="keep checkpoint_best.pt per run")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", help="OMP_NUM_THREADS for each run")
    p.add_argument("--extra-args", help="appended to every fairseq-train command (quoted string)")
    p.add_argument("--retry-failed", action="store_true", help="re-run runs whose status is failed")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--emit-jobs", type=absolute_path, help="write one command per line (for job arrays) and exit")
    p.add_argument("--only-run", type=int, help="run only the run with this index (0-based; job arrays)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not echo fairseq's output (it is in train.log)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs = plan(args)
    if args.emit_jobs:
        base = [sys.executable, str(ENTRY_POINT), *absolute_argv(list(sys.argv[1:] if argv is None else argv))]
        lines = [shlex.join(base + ["--only-run", str(i), "--no-report"]) for i in range(len(runs))]
        args.emit_jobs.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} commands to {args.emit_jobs}")
        return 0
    selected = [runs[args.only_run]] if args.only_run is not None else runs
    if not args.dry_run:
        check_data(args)
    failed = 0
    for i, run in enumerate(selected):
        status = run_status(run["dir"])
        tag = f"{run['task']}/{run['method']}/seed{run['seed']}"
        if status == "ok" or (status == "failed" and not args.retry_failed):
            why = f"; --retry-failed re-runs it ({failure_report(run)})" if status == "failed" else ""
            print(f"[sweep] {tag}: {status}, skipped (restartable){why}")
            failed += status == "failed"
            continue
        if args.dry_run:
            print(shlex.join(str(c) for c in run["cmd"]))
            continue
        print(f"[sweep] ({i + 1}/{len(selected)}) {tag}: fairseq-train ...", flush=True)
        status = execute(run, echo=not args.quiet, threads=args.threads)
        print(f"[sweep] {tag}: {status}" + (f" ({failure_report(run)})" if status == "failed" else ""), flush=True)
        failed += status == "failed"
    if not (args.no_report or args.dry_run):
        write_report(args.output_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
