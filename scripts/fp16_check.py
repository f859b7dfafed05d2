#!/usr/bin/env python
"""fp16 check (GPU): train every method with `--fp16` and `--memory-efficient-fp16` for a few hundred
updates on a roberta-base-shaped model (random init, tiny synthetic data) and check that nothing becomes
NaN/inf beyond fairseq's loss-scaler overflow handling; report the noise-effectiveness metrics
(r3f_noise_effective, hype_noise_effective, PATS pats_frac_noised / pats_frac_zeroed_by_margin).

    python scripts/fp16_check.py --out-dir /tmp/fp16 [--updates 300] [--methods r3f,hype_n]
    python scripts/fp16_check.py --out-dir /tmp/fp16 --cpu-smoke   # CPU, tiny model, a few updates
    python scripts/fp16_check.py --out-dir /dev/shm/fp16 --deadline-s 240   # bounded (scripts/gpu_check.py)

A run FAILS when: it raises (e.g. fairseq's "Minimum loss scale reached"), a logged train/valid loss is
not finite, a final parameter or optimizer-state tensor is not finite, more than --max-overflow-frac of
its steps overflowed, or a noise method logged no noise-effectiveness metric. Exit status 1 if any run
fails. Runs share one process (fairseq's imports dominate small runs); results go to
OUT_DIR/summary.json (rewritten after every run, so a killed check leaves what it measured) and a table on
stdout. Runs go mode by mode (every method under --fp16 first), each run's checkpoints are deleted once
checked (--keep-checkpoints keeps them); --deadline-s stops starting runs that would end past the deadline
(estimated from the longest run so far) and lists them as skipped.

NoisyTune perturbs a pretrained start once: it fine-tunes from the checkpoint its registry baseline
(vanilla_adamax) wrote in the same mode, so that baseline runs first; "NoisyTune applied" in its log is its
proof that the noise ran.

--cpu-smoke: `--memory-efficient-fp16 --cpu` only (plain `--fp16 --cpu` needs CUDA in fairseq), 2-layer
dim-64 models; note fairseq's overflow path calls `.cuda()` (fairseq/trainer.py:1022), so a CPU run that
overflows crashes instead of skipping the step: the smoke uses a low initial loss scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from robustft_common.methods import ADAM, flag_value, method_flags
from robustft_common.methods import METHODS as REGISTRY
from robustft_testing import shapes
from robustft_testing.synthetic_data import toy_classification

REPO = Path(__file__).resolve().parents[1]
# Every registered method at its paper's values (the noise effectiveness at those scales is the question),
# flags from the method registry. A method whose flags perturb a pretrained start (NoisyTune) starts from
# its baseline's checkpoint of the same mode (STARTS_FROM).
SENTENCE_PREDICTION = {name: method_flags(name) for name in REGISTRY}
STARTS_FROM: dict[str, str] = {
    name: str(REGISTRY[name].baseline)
    for name, flags in SENTENCE_PREDICTION.items()
    if float(flag_value(flags, "--noisytune-lambda") or 0) > 0
}
SEQ2SEQ = {
    "hyperdecoder": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "hyperdecoder_r3f": [
        "--criterion",
        "label_smoothed_cross_entropy_r3f",
        "--label-smoothing",
        "0.1",
        "--eps",
        "1e-5",
    ],
}
METHODS = [*SENTENCE_PREDICTION, *SEQ2SEQ]
REPORTED_PREFIXES = ("r3f_", "hype_", "pats_", "symm_kl", "neftune_", "rdrop_kl")
MODES = {"fp16": ["--fp16"], "memory_efficient_fp16": ["--memory-efficient-fp16"]}


def method_argv_flags(method: str) -> list:
    """The method's own flags, plus --pats-log-stats where PATS noise runs (to log pats_frac_noised)."""
    flags = list(SENTENCE_PREDICTION.get(method) or SEQ2SEQ[method])
    if "pats_frac_noised" in noise_keys(flags):
        flags.append("--pats-log-stats")
    return flags


def noise_keys(flags) -> list:
    """Metrics a run with these flags must log: proof that its noise ran and how much survived fp16."""
    keys = []
    if flag_value(flags, "--criterion") in ("sentence_prediction_r3f", "label_smoothed_cross_entropy_r3f"):
        keys.append("r3f_noise_effective")
    if flag_value(flags, "--hype-type") not in (None, "none"):
        keys.append("hype_noise_effective")
    if float(flag_value(flags, "--neftune-alpha") or 0) > 0:
        keys.append("neftune_noise_effective")
    pats_noise = flag_value(flags, "--pats-noise") or "1e-6"  # adamax_pats's default sigma
    if flag_value(flags, "--optimizer") == "adamax_pats" and float(pats_noise) > 0:
        keys.append("pats_frac_noised")
    if float(flag_value(flags, "--noisytune-lambda") or 0) > 0:
        keys.append("noisytune_applied")  # from its log line (pats_src/optim.py `_maybe_noisytune`)
    return keys


def adamax_family(method: str) -> bool:
    return method in REGISTRY and REGISTRY[method].optimizer_family == "adamax"


TINY_ROBERTA = list(shapes.TINY_ROBERTA)


# ------------------------------------------------------------------------------------------ data
def make_data(root: Path, n_train: int, n_valid: int):
    """Synthetic binary task (200-word vocab, 4-40 tokens) in RoBERTa's GLUE layout and in
    glue_preprocess's text2text layout."""
    return toy_classification(root, n_train, n_valid, vocab=200, min_len=4, max_len=40)


# ------------------------------------------------------------------------------------------ runs
def run_argv(method: str, mode: str, data, save_dir: Path, updates: int, smoke: bool, start: Path | None = None):
    sp, t2t = data
    common = [
        "--user-dir",
        str(REPO / "robustft"),
        "--max-update",
        str(updates),
        "--save-dir",
        str(save_dir),
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--seed",
        "1",
        "--num-workers",
        "0",
        "--no-epoch-checkpoints",
        "--required-batch-size-multiple",
        "1",
        "--batch-size",
        "16",
        "--lr-scheduler",
        "polynomial_decay",
        "--warmup-updates",
        str(max(1, updates // 16)),
        "--total-num-update",
        str(updates),
        "--clip-norm",
        "0.0",
        # the RoBERTa GLUE recipe's loss scaling (fairseq.md section 3); low start on CPU
        "--fp16-init-scale",
        "4" if not smoke else "1",
        "--threshold-loss-scale",
        "1",
        "--fp16-scale-window",
        "128",
        *MODES[mode],
    ]
    common += ["--lr", "1e-4"]  # the optimizer and its settings: the method's flags (registry)
    if adamax_family(method) and mode == "fp16":
        common += ["--fp16-no-flatten-grads"]  # adamax, PATS, SAGE keep per-tensor state: no flat fp32 buffer
    if smoke:
        common += ["--cpu"]
    if start is not None:
        common += ["--finetune-from-model", str(start)]
    if method in SENTENCE_PREDICTION:
        model = TINY_ROBERTA if smoke else ["--arch", "roberta_base"]
        return [
            str(sp),
            "--task",
            "sentence_prediction",
            "--num-classes",
            "2",
            "--init-token",
            "0",
            "--separator-token",
            "2",
            "--max-positions",
            "512",
            *model,
            *common,
            "--ddp-backend",
            "legacy_ddp",
            *method_argv_flags(method),
        ]
    arch = "hyperdecoder_bart_tiny" if smoke else "hyperdecoder_bart_base"
    return [
        str(t2t),
        "--task",
        "hyperdecoder_glue",
        "-s",
        "src",
        "-t",
        "tgt",
        "--arch",
        arch,
        *common,
        "--ddp-backend",
        "legacy_ddp",
        *ADAM,
        *method_argv_flags(method),
    ]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _json_records(lines):
    records = []
    for line in lines:
        start = line.find("{")
        if start >= 0:
            try:
                records.append(json.loads(line[start:]))
            except json.JSONDecodeError:
                pass
    return records


def _finite_state(obj) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite_state(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite_state(v) for v in obj)
    return True


def _stats(values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "last": values[-1]}


def save_dir_of(out_dir: Path, method: str, mode: str) -> Path:
    return out_dir / f"{method}.{mode}"


def start_checkpoint(method: str, mode: str, out_dir: Path) -> Path | None:
    """The checkpoint `method` fine-tunes from (STARTS_FROM), None for a from-scratch method; KeyError-free:
    a missing file is reported by the caller."""
    if method not in STARTS_FROM:
        return None
    return save_dir_of(out_dir, STARTS_FROM[method], mode) / "checkpoint_last.pt"


def run_one(method, mode, data, out_dir: Path, updates: int, smoke: bool, max_overflow_frac: float) -> dict:
    import torch
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    save_dir = save_dir_of(out_dir, method, mode)
    start = start_checkpoint(method, mode, out_dir)
    if start is not None and not start.exists():
        return skipped(method, mode, f"needs {STARTS_FROM[method]}'s checkpoint of this mode (run it first)")
    argv = run_argv(method, mode, data, save_dir, updates, smoke, start)
    capture = _Capture()
    logging.getLogger().addHandler(capture)
    result = {"method": method, "mode": mode, "argv": argv, "problems": []}
    started = time.time()
    try:
        if hasattr(checkpoint_utils.save_checkpoint, "best"):
            del checkpoint_utils.save_checkpoint.best  # per run, not per process
        sys.argv = ["fairseq-train", *argv]
        train.cli_main()
    except BaseException as err:  # FloatingPointError, SystemExit, ...
        result["problems"].append(f"raised {type(err).__name__}: {err}")
    finally:
        logging.getLogger().removeHandler(capture)
    result["seconds"] = round(time.time() - started, 1)

    records = _json_records(capture.lines)
    train_recs = [r for r in records if "num_updates" in r and "loss" in r]
    valid_recs = [r for r in records if "valid_loss" in r]
    result["updates"] = int(train_recs[-1]["num_updates"]) if train_recs else 0
    result["overflows"] = sum("gradient overflow detected" in line for line in capture.lines)
    steps = result["updates"] + result["overflows"]
    result["overflow_frac"] = result["overflows"] / steps if steps else 0.0
    result["final_loss_scale"] = (
        float(train_recs[-1]["loss_scale"]) if train_recs and "loss_scale" in train_recs[-1] else None
    )
    losses = [float(r["loss"]) for r in train_recs] + [float(r["valid_loss"]) for r in valid_recs]
    result["loss_first_last"] = [float(train_recs[0]["loss"]), float(train_recs[-1]["loss"])] if train_recs else None

    if result["updates"] < updates:
        result["problems"].append(f"only {result['updates']} of {updates} updates")
    if not all(math.isfinite(v) for v in losses):
        result["problems"].append("non-finite logged loss")
    if result["overflow_frac"] > max_overflow_frac:
        result["problems"].append(f"{result['overflows']} of {steps} steps overflowed")
    ckpt = save_dir / "checkpoint_last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")  # weights_only, plugin safe globals
        if not _finite_state(state["model"]):
            result["problems"].append("non-finite parameter in checkpoint_last.pt")
        if not _finite_state(state.get("last_optimizer_state", {})):
            result["problems"].append("non-finite optimizer state in checkpoint_last.pt")
    else:
        result["problems"].append("no checkpoint_last.pt")

    noise = {}
    for key in sorted({k for r in train_recs for k in r if k.startswith(REPORTED_PREFIXES)}):
        values = [float(r[key]) for r in train_recs if key in r]
        noise[key] = _stats(values)
    applied = sum(line.startswith("NoisyTune applied") for line in capture.lines)
    if applied:
        noise["noisytune_applied"] = _stats([float(applied)])
    result["noise"] = noise
    for key in noise_keys(method_argv_flags(method)):
        if key not in noise:
            result["problems"].append(f"{key} never logged")
    result["ok"] = not result["problems"]
    return result


def skipped(method: str, mode: str, why: str) -> dict:
    """The record of a run that did not start (time budget, missing start checkpoint): not ok."""
    return {
        "method": method,
        "mode": mode,
        "ok": False,
        "skipped": why,
        "problems": [f"skipped: {why}"],
        "updates": 0,
        "overflows": 0,
        "loss_first_last": None,
        "final_loss_scale": None,
        "noise": {},
        "seconds": 0.0,
    }


def write_summary(path: Path, summary: dict) -> None:
    """Atomically (temp file + rename): a check killed mid-write leaves the previous summary."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)


def plan(methods: list, modes: list) -> list:
    """(method, mode) pairs, mode by mode (every method under the first mode before the second), each
    method after the baseline it starts from."""
    order: list = []
    for method in methods:
        if method in order or (STARTS_FROM.get(method) in methods and STARTS_FROM[method] not in order):
            continue  # already placed, or placed right after its baseline
        order += [method, *[m for m in methods if STARTS_FROM.get(m) == method and m not in order]]
    return [(method, mode) for mode in modes for method in order]


def still_needed(pairs: list, done: int, method: str, mode: str) -> bool:
    """Whether a later run of `pairs` (after index `done`) starts from this run's checkpoint."""
    return any(mo == mode and STARTS_FROM.get(me) == method for me, mo in pairs[done + 1 :])


def _table(results) -> str:
    lines = [
        "| method | mode | ok | updates | overflows | loss first->last | loss scale | noise metrics (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        noise = ", ".join(f"{k} {v['mean']:.4g}" for k, v in r["noise"].items())
        loss = "" if not r["loss_first_last"] else f"{r['loss_first_last'][0]:.3f}->{r['loss_first_last'][1]:.3f}"
        lines.append(
            f"| {r['method']} | {r['mode']} | {'yes' if r['ok'] else 'NO: ' + '; '.join(r['problems'])} | "
            f"{r['updates']} | {r['overflows']} | {loss} | {r['final_loss_scale']} | {noise} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument(
        "--max-overflow-frac",
        type=float,
        default=0.2,
        help="fail a run when more than this fraction of its steps overflowed",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, tiny models, --memory-efficient-fp16 only, 2 updates (tests the script)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="start no run that would end later than this many seconds after the start (estimated from the "
        "longest run so far); the rest are listed as skipped",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for flag, values, known in (("--methods", methods, METHODS), ("--modes", modes, MODES)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")

    started = time.time()
    import shutil

    import torch

    import robustft  # noqa: F401  (safe globals for reading the checkpoints back)

    if args.cpu_smoke:
        modes = ["memory_efficient_fp16"]
        updates, n_train, n_valid = min(args.updates, 2), 32, 16
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (fp16 training); use --cpu-smoke to exercise the script on CPU")
        # one epoch covers every update: one validation and one checkpoint write (~1.5 GB) per run
        updates, n_train, n_valid = args.updates, max(2048, 16 * args.updates), 256
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out_dir / "data", n_train, n_valid)
    device = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    summary = {"device": device, "torch": torch.__version__, "updates": updates, "results": []}
    results = summary["results"]
    pairs = plan(methods, modes)
    longest = 0.0
    for i, (method, mode) in enumerate(pairs):
        elapsed = time.time() - started
        if args.deadline_s is not None and elapsed + longest > args.deadline_s:
            results.append(skipped(method, mode, f"time budget ({elapsed:.0f} s used of {args.deadline_s:.0f} s)"))
        else:
            t0 = time.time()
            results.append(run_one(method, mode, data, args.out_dir, updates, args.cpu_smoke, args.max_overflow_frac))
            longest = max(longest, time.time() - t0)
            if not args.keep_checkpoints and not still_needed(pairs, i, method, mode):
                shutil.rmtree(save_dir_of(args.out_dir, method, mode), ignore_errors=True)
        print(f"FP16CHECK {json.dumps({k: results[-1][k] for k in ('method', 'mode', 'ok', 'problems')})}", flush=True)
        write_summary(args.out_dir / "summary.json", summary)
    if not args.keep_checkpoints:  # baselines kept for a start that did not run
        for method, mode in pairs:
            shutil.rmtree(save_dir_of(args.out_dir, method, mode), ignore_errors=True)
    print(f"\nfp16 check on {device}, torch {torch.__version__}, {updates} updates per run\n")
    print(_table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
