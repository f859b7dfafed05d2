"""How far does each method move the encoder's weights in its first updates, at the same learning rate?

Mixout and ChildTuning-F multiply the gradient by an unbiased random mask (E = 1): Mixout's mixed weights by
m / (1 - p) per input column, ChildTuning-F every entry by Bernoulli(p) / p. Under Adam the mean of such a
gradient is unchanged and its second moment is 1/q times larger (q = 1 - p for Mixout, p for ChildTuning-F),
so the part of each step that follows the mean gradient should shrink by about sqrt(q) (Mixout at p 0.9:
0.32; ChildTuning-F at p 0.3: 0.55). The mask's randomness adds a random-walk part that moves the weights
without fitting, so the total displacement need not shrink as much; the training loss shows the fitting.
ChildTuning-D's fixed mask has no rescale and freezes the entries outside its child. This measures both on
the quality study's model and data: each method's exact study command (registry flags, study lr, schedule, seed)
stopped after each of `--updates` updates, then, over every Transformer layer's linear weight (the ones Mixout
mixes and ChildTuning masks), ||W_t - W_0|| / ||W_0|| and its ratio to vanilla's, plus the mean training loss
of the last 10 updates.

    python benchmarks/quality/step_size.py --work-dir /work/qwork/study --task SST-2 --lr 1e-4 \
        --out benchmarks/results/quality/step_size

Writes OUT.md and OUT.json (runs in a temporary directory, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise_scale import command_line, write_outputs  # noqa: E402

from robustft_common import glue_tasks  # noqa: E402

METHODS = ("vanilla", "mixout", "childtuning_f", "childtuning_d")
LAYER_WEIGHT = re.compile(r"sentence_encoder\.layers\.\d+\..*\.weight$")


def layer_weights(state: dict) -> dict[str, torch.Tensor]:
    """The Transformer layers' linear weights (2-D `...layers.N.<linear>.weight`) of a model state dict."""
    return {k: v.float() for k, v in state.items() if LAYER_WEIGHT.search(k) and v.dim() == 2}


def displacement(start: dict, end: dict) -> float:
    """||W_end - W_start|| / ||W_start|| over all the tensors of `start` together (Frobenius)."""
    moved = sum(float((end[k] - w).pow(2).sum()) for k, w in start.items())
    size = sum(float(w.pow(2).sum()) for w in start.values())
    return (moved / size) ** 0.5


def mean_logged_loss(log_text: str, last: int = 10) -> float | None:
    """The mean training loss of the last `last` `train_inner` lines (fairseq's simple log format; with
    `--log-interval 1` one batch each)."""
    found = re.findall(r"\| train_inner \|.*?[ |]loss[ =]([0-9.]+)", log_text)
    return sum(map(float, found[-last:])) / len(found[-last:]) if found else None


def short_run(work: Path, task: str, method: str, seed: int, lr: float, updates: int, out_dir: Path):
    """The study's command for (task, method, seed) at `lr`, saving only its last checkpoint after `updates`."""
    from robustft_experiments import quality

    data = work / "data" / "main" / glue_tasks.canonical_name(task)
    data = data.with_name(data.name + "-bin")
    if not data.exists():
        raise SystemExit(f"--work-dir: {data} is missing; run the quality study's main stage for {task} first")
    pretrained = quality.prepare_model(work)
    argv = quality.train_command(task, method, seed, lr, data, out_dir, pretrained, quality.train_size(data))
    argv = [a for a in argv if a != "--no-save"]
    argv += ["--max-update", str(updates), "--no-epoch-checkpoints", "--no-save-optimizer-state"]
    argv += ["--log-interval", "1", "--disable-validation"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{method}: fairseq-train failed:\n{done.stderr[-3000:]}")
    state = torch.load(out_dir / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    done_updates = state["optimizer_history"][-1]["num_updates"]
    if done_updates != updates:  # the appended --max-update must win over the study's
        raise SystemExit(f"{method}: the run stopped after {done_updates} updates, not --updates {updates}")
    start = torch.load(pretrained["model"], map_location="cpu", weights_only=False)["model"]
    return layer_weights(start), layer_weights(state["model"]), mean_logged_loss(done.stdout + done.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True, help="the quality study's --work-dir")
    p.add_argument("--task", default="SST-2")
    p.add_argument("--lr", type=float, default=1e-4, help="the Adam family's study lr on --task")
    p.add_argument("--updates", default="63,189", help="comma list: stop after each (SST-2: one epoch, the study's 3)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, required=True, help="OUT.md / OUT.json")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if methods[0] != "vanilla":
        raise SystemExit("--methods: the first must be vanilla (the ratios' reference)")
    rows = []
    for updates in (int(u) for u in args.updates.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in methods:
                with tempfile.TemporaryDirectory() as tmp:
                    start, end, loss = short_run(
                        args.work_dir.resolve(), args.task, method, seed, args.lr, updates, Path(tmp)
                    )
                row = {"method": method, "updates": updates, "seed": seed, "displacement": displacement(start, end)}
                rows.append({**row, "train_loss": loss})
                print(json.dumps(rows[-1]), flush=True)
    reference = {(r["updates"], r["seed"]): r["displacement"] for r in rows if r["method"] == "vanilla"}
    for r in rows:
        r["x_vanilla"] = r["displacement"] / reference[r["updates"], r["seed"]]
    lines = [
        f"# Encoder displacement after the first updates ({args.task}, lr {args.lr:g}, all-MiniLM-L6-v2)",
        "",
        f"Command: `{command_line('step_size.py', argv)}`",
        "",
        "||W_t - W_0|| / ||W_0|| over every Transformer layer's linear weight, each method's study command "
        "stopped after `updates` updates (warmup and lr schedule as in the study); x vanilla: the ratio to "
        "vanilla's at the same seed and updates. Predicted under Adam for an unbiased mask kept with "
        "probability q: the mean-gradient part of the step about sqrt(q) x vanilla's (Mixout p 0.9: 0.32; "
        "ChildTuning-F p 0.3: 0.55); the mask's randomness adds movement that does not fit, so the "
        "displacement can shrink less than that while the training loss falls more slowly.",
        "",
        "| method | updates | seed | displacement | x vanilla | training loss, mean of the last 10 updates |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = "–" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        cells = (r["method"], r["updates"], r["seed"], f"{r['displacement']:.3e}", f"{r['x_vanilla']:.3f}", loss)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    result = {"command": command_line("step_size.py", argv), "task": args.task, "lr": args.lr, "rows": rows}
    write_outputs(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
