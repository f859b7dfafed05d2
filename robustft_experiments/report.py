"""Collect the best dev metric of every sweep run from fairseq's logs; write CSV/JSON, a markdown
"mean ± std over seeds" table (methods x tasks, like the papers' tables) and a PNG plot.

    python scripts/report.py SWEEP_DIR            # reads SWEEP_DIR/runs/<TASK>/<method>/seed<S>/train.log

A run counts as failed when its status.json says so, or when its log has no validation line; failed
runs are listed in the table, never filled in. Each task's column is its best-checkpoint metric (GLUE
task table), each method's row label and order come from the method registry.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

from robustft_common import atomic_files, glue_tasks
from robustft_common.methods import METHODS

# report order and table labels: the method registry; metric per task: the GLUE task table
METHOD_ORDER = list(METHODS)
TASK_ORDER = list(glue_tasks.REPORT_ORDER)


def method_label(method: str) -> str:
    """The registry's table label; a method the registry does not know (an old sweep) keeps its name."""
    return METHODS[method].label if method in METHODS else method


def task_metric(task: str) -> str:
    """The metric a task's column reports (fairseq's best-checkpoint metric, logged x100)."""
    return glue_tasks.TASKS[task].best_metric


# `... | valid on 'valid' subset | loss 0.998 | accuracy 52.7 | ... | num_updates 20`
_SIMPLE_VALID = re.compile(r"\| valid on '([^']+)' subset \|(.*)$")


def canonical_task(name: str, flag: str = "--tasks") -> str:
    """GLUE's spelling of a task name ("sts-b" -> "STS-B"); SystemExit naming the known tasks."""
    try:
        return glue_tasks.canonical_name(name, flag)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def parse_valid_records(log_text: str, subset: str = "valid") -> list[dict]:
    """Every validation record of a fairseq log (simple/tqdm or json format), in order."""
    records = []
    for line in log_text.splitlines():
        m = _SIMPLE_VALID.search(line)
        if m:
            if m.group(1) != subset:
                continue
            rec = {}
            for field in m.group(2).split("|"):
                parts = field.strip().split()
                if len(parts) == 2 and _number(parts[1]) is not None:
                    rec[parts[0]] = _number(parts[1])
            records.append(rec)
            continue
        start = line.find("{")
        if start >= 0 and f'"{subset}_loss"' in line:
            try:
                raw = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            prefix = f"{subset}_"
            records.append(
                {
                    k[len(prefix) :]: _number(v)
                    for k, v in raw.items()
                    if k.startswith(prefix) and _number(v) is not None
                }
            )
    return records


def best_of_run(log_text: str, metric: str, maximize: bool = True) -> dict | None:
    """Best (and last) value of `metric` over the validations of one run; None when there is none."""
    recs = [r for r in parse_valid_records(log_text) if metric in r]
    if not recs:
        return None
    pick = max if maximize else min
    best = pick(recs, key=lambda r: r[metric])
    return {
        "best": best[metric],
        "best_num_updates": best.get("num_updates"),
        "last": recs[-1][metric],
        "num_validations": len(recs),
        "all_metrics_at_best": best,
    }


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run folder runs/<TASK>/<method>/seed<S>/ of a sweep."""
    rows = []
    for run_dir in sorted(Path(sweep_dir).glob("runs/*/*/seed*")):
        task, method, seed = canonical_task(run_dir.parts[-3]), run_dir.parts[-2], int(run_dir.name[4:])
        metric = task_metric(task)
        status_file = run_dir / "status.json"
        status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "incomplete"}
        log = run_dir / "train.log"
        result = best_of_run(log.read_text(errors="replace"), metric) if log.exists() else None
        state = status["status"]
        if state == "ok" and result is None:
            state = "failed"  # finished without a single validation: nothing to report
        row = {
            "task": task,
            "method": method,
            "seed": seed,
            "status": state,
            "metric": metric,
            "best": None,
            "last": None,
            "best_num_updates": None,
            "seconds": status.get("seconds"),
            "returncode": status.get("returncode"),
            "log": str(log),
        }
        if result is not None and state == "ok":
            row.update(best=result["best"], last=result["last"], best_num_updates=result["best_num_updates"])
        rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> dict:
    """{(method, task): {"mean", "std", "n", "failed", "values"}} over seeds (sample std, 0 for n = 1)."""
    cells: dict = {}
    for r in rows:
        cell = cells.setdefault((r["method"], r["task"]), {"values": [], "failed": 0, "incomplete": 0, "not_landed": 0})
        if r["status"] == "ok":
            cell["values"].append(r["best"])
        elif r["status"] == "failed":
            cell["failed"] += 1
        elif r["status"] == "not_landed":
            cell["not_landed"] += 1
        else:
            cell["incomplete"] += 1
    for cell in cells.values():
        v = cell["values"]
        cell["n"] = len(v)
        cell["mean"] = statistics.fmean(v) if v else None
        cell["std"] = statistics.stdev(v) if len(v) > 1 else (0.0 if v else None)
    return cells


def _ordered(items, order):
    return sorted(set(items), key=lambda x: (order.index(x) if x in order else len(order), x))


def markdown_table(rows: list[dict], cells: dict | None = None) -> str:
    cells = cells or aggregate(rows)
    tasks = _ordered([r["task"] for r in rows], TASK_ORDER)
    methods = _ordered([r["method"] for r in rows], METHOD_ORDER)
    head = ["Method"] + [f"{t} ({task_metric(t)})" for t in tasks]
    if len(tasks) > 1:
        head.append("Avg")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        line, means = [method_label(m)], []
        for t in tasks:
            c = cells.get((m, t))
            if c is None:
                line.append("not run")
                continue
            if c["n"] == 0:
                line.append("failed" if c["failed"] else ("not landed" if c["not_landed"] else "incomplete"))
                continue
            # one run has no spread: "± 0.00" would claim a measured std of zero
            text = f"{c['mean']:.2f} ± {c['std']:.2f} (n={c['n']})" if c["n"] > 1 else f"{c['mean']:.2f} (n=1)"
            if c["failed"]:
                text += f", {c['failed']} failed"
            line.append(text)
            means.append(c["mean"])
        if len(tasks) > 1:
            line.append(f"{statistics.fmean(means):.2f}" if len(means) == len(tasks) else "–")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def majority_score(task: str) -> float | None:
    """The dev score of always predicting the majority class, in the task's column metric (GLUE task table)."""
    majority = glue_tasks.TASKS[task].dev_majority or {}
    return majority.get(task_metric(task))


def figure(rows: list[dict], cells: dict | None = None, title: str = "GLUE dev"):
    """The bar chart: mean per method and task, ± sample std where n > 1, the majority-class level per task."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger at DEBUG
    import matplotlib.pyplot as plt

    cells = cells or aggregate(rows)
    tasks = _ordered([r["task"] for r in rows], TASK_ORDER)
    methods = _ordered([r["method"] for r in rows], METHOD_ORDER)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(methods)) / 3), 4))
    for i, m in enumerate(methods):
        xs, ys, es, failed_x = [], [], [], []
        for j, t in enumerate(tasks):
            c = cells.get((m, t))
            x = j + (i - (len(methods) - 1) / 2) * width
            if c and c["n"]:
                xs.append(x)
                ys.append(c["mean"])
                es.append(c["std"] if c["n"] > 1 else math.nan)  # no error bar for a single run
            elif c:
                failed_x.append((x, "not landed" if c["not_landed"] else "failed"))
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=method_label(m))
        for x, label in failed_x:
            ax.text(
                x,
                0,
                label,
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color=bars.patches[0].get_facecolor() if bars.patches else "k",
            )
    majority = {j: majority_score(t) for j, t in enumerate(tasks)}
    for j, level in majority.items():
        if level is not None:
            # one legend entry for all tasks (matplotlib leaves labels starting with "_" out of the legend)
            legend = "majority class (dev)" if j == min(k for k, v in majority.items() if v is not None) else "_"
            line = ax.hlines(level, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1, label=legend)
            line.set_gid(f"majority {tasks[j]}")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({task_metric(t)})" for t in tasks])
    lows = [c["mean"] - (c["std"] if c["n"] > 1 else 0.0) for c in cells.values() if c["n"]]
    lows += [v for v in majority.values() if v is not None]
    if lows:
        # start near the data, so differences show, but never above 0 when a value (an MCC) is negative
        low = math.floor(min(lows) / 5) * 5 - 5
        ax.set_ylim(low if min(lows) < 0 else max(0, low), None)
    if any(low < 0 for low in lows):
        ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel("best dev metric (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path, cells: dict | None = None, title: str = "GLUE dev") -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, cells, title)
    atomic_files.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_report(sweep_dir: Path, title: str = "GLUE dev") -> dict:
    """results.csv / results.json / results.md / results.png in sweep_dir; prints the table."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        print(f"[report] no runs under {sweep_dir}/runs")
        return {"rows": [], "table": ""}
    cells = aggregate(rows)
    fields = [
        "task",
        "method",
        "seed",
        "status",
        "metric",
        "best",
        "last",
        "best_num_updates",
        "seconds",
        "returncode",
        "log",
    ]
    csv_text = io.StringIO(newline="")
    writer = csv.DictWriter(csv_text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_files.write_text(sweep_dir / "results.csv", csv_text.getvalue())
    summary = [
        {
            "method": m,
            "task": t,
            **{k: c[k] for k in ("mean", "std", "n", "failed", "incomplete", "not_landed", "values")},
        }
        for (m, t), c in sorted(cells.items())
    ]
    atomic_files.write_text(sweep_dir / "results.json", json.dumps({"runs": rows, "summary": summary}, indent=1))
    table = markdown_table(rows, cells)
    tasks = _ordered([r["task"] for r in rows], TASK_ORDER)
    levels = [f"{t} {task_metric(t)} {majority_score(t):.2f}" for t in tasks if majority_score(t) is not None]
    majority = f"\nMajority class (always its label) on dev: {', '.join(levels)}.\n" if levels else ""
    atomic_files.write_text(
        sweep_dir / "results.md",
        f"# {title}\n\nBest dev metric per run, mean ± std over seeds (sample std; n = finished runs; no std "
        f"for n = 1).\n\n{table}{majority}",
    )
    plot(rows, sweep_dir / "results.png", cells, title)
    print(table)
    print(f"[report] wrote {sweep_dir}/results.{{csv,json,md,png}}")
    return {"rows": rows, "cells": cells, "table": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--title", default="GLUE dev")
    args = p.parse_args(argv)
    write_report(args.sweep_dir, args.title)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
