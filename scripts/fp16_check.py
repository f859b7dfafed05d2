#!/usr/bin/env python
"""fp16 check (GPU): train every method with `--fp16` and `--memory-efficient-fp16` for a few hundred
updates on a roberta-base-shaped model (random init, tiny synthetic data) and check that nothing becomes
NaN/inf beyond fairseq's loss-scaler overflow handling; report the noise-effectiveness metrics
(r3f_noise_effective, hype_noise_effective, PATS pats_frac_noised / pats_frac_zeroed_by_margin).

    python scripts/fp16_check.py --out-dir /tmp/fp16 [--updates 300] [--methods r3f,hype_n]
    python scripts/fp16_check.py --out-dir /tmp/fp16 --cpu-smoke   # CPU, tiny model, a few updates

A run FAILS when: it raises (e.g. fairseq's "Minimum loss scale reached"), a logged train/valid loss is
not finite, a final parameter or optimizer-state tensor is not finite, more than --max-overflow-frac of
its steps overflowed, or a noise method logged no noise-effectiveness metric. Exit status 1 if any run
fails. Runs share one process (fairseq's imports dominate small runs); results go to
OUT_DIR/summary.json and a table on stdout.

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
from robustft_testing.synthetic_data import toy_classification

REPO = Path(__file__).resolve().parents[1]
# Every registered method at its paper's values (the noise effectiveness at those scales is the question),
# flags from the method registry; NoisyTune is left out: it perturbs once, before training, and needs a
# pretrained start (this check trains from random init).
SENTENCE_PREDICTION = {name: method_flags(name) for name in REGISTRY if name != "noisytune"}
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
    return keys


def adamax_family(method: str) -> bool:
    return method in REGISTRY and REGISTRY[method].optimizer_family == "adamax"


TINY_ROBERTA = [
    "--arch",
    "roberta_base",
    "--encoder-layers",
    "2",
    "--encoder-embed-dim",
    "64",
    "--encoder-ffn-embed-dim",
    "128",
    "--encoder-attention-heads",
    "2",
]


# ------------------------------------------------------------------------------------------ data
def make_data(root: Path, n_train: int, n_valid: int):
    """Synthetic binary task (200-word vocab, 4-40 tokens) in RoBERTa's GLUE layout and in
    glue_preprocess's text2text layout."""
    return toy_classification(root, n_train, n_valid, vocab=200, min_len=4, max_len=40)


# ------------------------------------------------------------------------------------------ runs
def run_argv(method: str, mode: str, data, save_dir: Path, updates: int, smoke: bool):
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


def run_one(method, mode, data, out_dir: Path, updates: int, smoke: bool, max_overflow_frac: float) -> dict:
    import torch
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    save_dir = out_dir / f"{method}.{mode}"
    argv = run_argv(method, mode, data, save_dir, updates, smoke)
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
    result["noise"] = noise
    for key in noise_keys(method_argv_flags(method)):
        if key not in noise:
            result["problems"].append(f"{key} never logged")
    result["ok"] = not result["problems"]
    return result


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
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for flag, values, known in (("--methods", methods, METHODS), ("--modes", modes, MODES)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")

    import torch

    import robustft  # noqa: F401  (safe globals for reading the checkpoints back)

    if args.cpu_smoke:
        modes = ["memory_efficient_fp16"]
        updates, n_train, n_valid = min(args.updates, 2), 32, 16
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (fp16 training); use --cpu-smoke to exercise the script on CPU")
        updates, n_train, n_valid = args.updates, 2048, 256
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out_dir / "data", n_train, n_valid)
    results = []
    for method in methods:
        for mode in modes:
            results.append(run_one(method, mode, data, args.out_dir, updates, args.cpu_smoke, args.max_overflow_frac))
            print(
                f"FP16CHECK {json.dumps({k: results[-1][k] for k in ('method', 'mode', 'ok', 'problems')})}", flush=True
            )
    device = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    summary = {"device": device, "torch": torch.__version__, "updates": updates, "results": results}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nfp16 check on {device}, torch {torch.__version__}, {updates} updates per run\n")
    print(_table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
