#!/usr/bin/env python
"""GPU check: every GPU-only figure of the project in one bounded command on a lent GPU machine.

    python3 scripts/gpu_check.py --out "$OUT"                  # on the device (README "GPU check")
    python scripts/gpu_check.py --cpu --out /tmp/gpu-check      # CPU mode: tiny shapes, a few updates

Steps, in order, each a subprocess with a deadline (cumulative budgets: time a step leaves over goes to the
next; the whole stays within --budget-s of the start, install included):
 0. install (default on the GPU, --install on CPU): `pip install --no-index --no-deps --require-hashes
    --target SITE -r BUNDLE/requirements.txt` (the bundle of `make gpu-bundle`: fairseq and what the device
    lacks), so the preinstalled torch is never touched (its version and file are compared before and after);
    the plugin runs from the working tree (REPO on PYTHONPATH, as `make install`'s editable install has it:
    fairseq refuses a `--user-dir robustft` whose module is imported from another folder), and the bundle's
    plugin sources are compared with it; fairseq's Cython extensions, hydra and the plugin are imported, and
    this script runs again with SITE and REPO on PYTHONPATH.
 a. fp16: scripts/fp16_check.py: every registered method (the method registry) + the Hyperdecoder ones at
    roberta-base / bart-base shape under --fp16, then under --memory-efficient-fp16, --fp16-updates updates
    each: finite losses, overflows, final loss scale, the noise-effectiveness metrics (`*_noise_effective`,
    pats_frac_noised); its own --deadline-s stops it before the step's deadline.
 b. bench: benchmarks/run.py --size large (roberta-large, bart-large, --fp16): step-time and peak-memory
    ratios; its --max-seconds stops starting rounds past the deadline.
 c. finetune: scripts/sweep.py: all-MiniLM-L6-v2 (the bundle's, restricted to RTE's tokens, fp16) fine-tuned
    on RTE with --fp16, vanilla and R3F (--finetune-methods), RTE dev accuracy per epoch.
OUT gets gpu_check.json and gpu_check.md, rewritten after every step (a killed check leaves what it
measured), and gpu_check-logs.tar.gz (every step's log and raw results) at the end.

CPU mode (--cpu): the same steps on tiny shapes (2-layer dim-64 models, --memory-efficient-fp16 on CPU,
2 updates, the tiny benchmark size, fine-tunes of 2 updates in fp32), for CI and for checking an install.

This script imports only the standard library until the install is done: on the device fairseq and the
plugin exist only after step 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "gpu_bundle"
DEFAULT_SITE = Path("/tmp/robustft-site")
# seconds per step on the device; cumulative deadlines, so the whole ends by their sum (540 s: a 600 s
# device call leaves a minute for the transfers and the tool). bench: one round of roberta-large blocks
# (~5 s each) must fit; fp16 takes the most, and stops mid-way through --memory-efficient-fp16 at worst.
GPU_BUDGETS = {"install": 90, "fp16": 250, "bench": 120, "finetune": 80}
# CPU mode only guards against hangs: a shared 2-core machine is many times slower than its owner alone
CPU_BUDGETS = {"install": 600, "fp16": 900, "bench": 600, "finetune": 600}
# margins inside a step: the child's own stop leaves this much for its exit and its last write
FP16_MARGIN_S, BENCH_MARGIN_S = 20, 30
SHM_MIN_FREE = 16 << 30
# the RoBERTa GLUE recipe's loss scaling (as scripts/fp16_check.py and benchmarks/run.py use)
FP16_FLAGS = "--fp16 --fp16-init-scale 4 --threshold-loss-scale 1 --fp16-scale-window 128"


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ subprocesses
def run_bounded(cmd: list, deadline: float, log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` (own process group, output to log_path) until it exits or `deadline` (time.time()) passes;
    then SIGTERM the whole group, SIGKILL after 10 s. Returns returncode, seconds and timed_out."""
    started = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,  # its fairseq-train / worker children go with it
        )
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"returncode": proc.returncode, "seconds": round(time.time() - started, 1), "timed_out": timed_out}


def child_env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


# ------------------------------------------------------------------------------------------ step 0: install
TORCH_ID = "import json, torch; print(json.dumps({'torch': torch.__version__, 'file': torch.__file__}))"
# versions and device without importing fairseq (the steps import it; the install step checks the imports)
LIGHT_ENV = (
    "import json, sys, torch, importlib.metadata as md\n"
    "cuda = torch.cuda.is_available()\n"
    "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda,"
    " 'device': torch.cuda.get_device_name(0) if cuda else 'cpu', 'fairseq': md.version('fairseq-fixed')}))\n"
)
IMPORT_CHECK = (
    "import json, sys, torch, fairseq, hydra, omegaconf, bitarray, robustft\n"
    "from fairseq.data import data_utils_fast, token_block_utils_fast  # Cython: numpy ABI + cp312\n"
    "cuda = torch.cuda.is_available()\n"
    "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, 'torch_file': torch.__file__,"
    " 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if cuda else 'cpu',"
    " 'fairseq': fairseq.__version__, 'fairseq_file': fairseq.__file__, 'hydra': hydra.__version__,"
    " 'omegaconf': omegaconf.__version__, 'robustft_file': robustft.__file__}))\n"
)


def last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def stale_plugin_files(manifest: dict) -> list:
    """Plugin files whose content in the working tree differs from the bundle's wheel (bundle built from
    another state of the tree: rebuild it with `make gpu-bundle`)."""
    stale = []
    for path, digest in manifest.get("plugin_sources", {}).items():
        tree = REPO / path
        if not tree.exists() or hashlib.sha256(tree.read_bytes()).hexdigest() != digest:
            stale.append(path)
    return stale


def environment(env: dict | None = None, script: str = IMPORT_CHECK) -> dict:
    """Versions and device of the interpreter the steps run with (by default with fairseq, its Cython
    extensions and the plugin imported)."""
    check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    if check.returncode != 0:
        raise RuntimeError(f"imports failed:\n{check.stderr[-3000:]}")
    return last_json_line(check.stdout)


def python_path(site: Path) -> str:
    """PYTHONPATH after the install: the bundle's packages and the working tree's plugin packages."""
    return os.pathsep.join(filter(None, [str(site), str(REPO), os.environ.get("PYTHONPATH")]))


def install(bundle: Path, site: Path, work: Path) -> dict:
    """Step 0: the bundle into `site` with pip --no-index --no-deps --require-hashes; torch unchanged."""
    requirements = bundle / "requirements.txt"
    if not requirements.exists():
        raise SystemExit(f"{requirements} is missing: build the bundle with `make gpu-bundle` and carry it")
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = {"bundle_commit": manifest.get("commit"), "bundle_created": manifest.get("created")}
    before = subprocess.run([sys.executable, "-c", TORCH_ID], capture_output=True, text=True, check=True)
    shutil.rmtree(site, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--require-hashes", "--no-compile"]
    pip += ["--disable-pip-version-check", "--target", str(site), "-r", str(requirements)]
    pip += ["--find-links", str(bundle / "wheels")]
    proc = subprocess.run(pip, capture_output=True, text=True)
    (work / "install.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install from the bundle failed:\n{tail(work / 'install.log')}")
    env = dict(os.environ, PYTHONPATH=python_path(site))
    after = subprocess.run([sys.executable, "-c", TORCH_ID], capture_output=True, text=True, env=env, check=True)
    if last_json_line(before.stdout) != last_json_line(after.stdout):
        raise RuntimeError(f"the install changed torch: {before.stdout.strip()} -> {after.stdout.strip()}")
    record["environment"] = environment(env)
    record["torch_unchanged"] = last_json_line(before.stdout)
    record["stale_plugin_files"] = stale_plugin_files(manifest)
    record["pip"] = " ".join(pip[1:])
    return record


# ------------------------------------------------------------------------------------------ step a: fp16
def step_fp16(args, deadline: float, work: Path) -> dict:
    out = work / "fp16"
    cmd = [sys.executable, REPO / "scripts" / "fp16_check.py", "--out-dir", out]
    cmd += ["--deadline-s", str(max(1, int(deadline - time.time() - FP16_MARGIN_S)))]
    cmd += ["--cpu-smoke"] if args.cpu else ["--updates", str(args.fp16_updates)]
    if args.fp16_methods:
        cmd += ["--methods", args.fp16_methods]
    run = run_bounded(cmd, deadline, work / "fp16.log", child_env(args.cpu))
    summary = out / "summary.json"
    if not summary.exists():
        return {**run, "error": f"no summary.json; log tail:\n{tail(work / 'fp16.log')}"}
    data = json.loads(summary.read_text())
    keep = ("method", "mode", "ok", "skipped", "updates", "overflows", "overflow_frac", "final_loss_scale")
    runs = [
        {k: r.get(k) for k in keep}
        | {
            "loss_first_last": r.get("loss_first_last"),
            "seconds": r.get("seconds"),
            "noise_mean": {k: v["mean"] for k, v in r.get("noise", {}).items()},
            "problems": r.get("problems", []),
        }
        for r in data["results"]
    ]
    return {**run, "device": data.get("device"), "updates": data.get("updates"), "runs": runs}


# ------------------------------------------------------------------------------------------ step b: bench
def step_bench(args, deadline: float, work: Path) -> dict:
    out = work / "bench"
    size = "tiny" if args.cpu else "large"
    cmd = [sys.executable, REPO / "benchmarks" / "run.py", "--size", size, "--out", out]
    cmd += ["--max-seconds", str(max(1, int(deadline - time.time() - BENCH_MARGIN_S)))]
    cmd += ["--rounds", "1", "--warmup", "0", "--steps", "1"] if args.cpu else ["--rounds", "3", "--warmup", "2"]
    cmd += [] if args.cpu else ["--steps", "5", "--threads", "8"]
    if args.bench_only:
        cmd += ["--only", args.bench_only]
    run = run_bounded(cmd, deadline, work / "bench.log", child_env(args.cpu))
    result = out / f"{size}.json"
    if not result.exists():
        return {**run, "error": f"no {size}.json; log tail:\n{tail(work / 'bench.log')}"}
    data = json.loads(result.read_text())
    keep = ("median_ms", "x_vanilla", "x_baseline", "baseline", "cuda_peak_mb", "peak_rss_over_before_mb")
    configs = {name: {k: row[k] for k in keep if k in row} for name, row in data["configs"].items()}
    return {
        **run,
        "meta": {k: data["meta"].get(k) for k in ("size", "device_name", "batch", "seq_len", "rounds", "steps")},
        "configs": configs,
        "targets": data["targets"],
        "table": (out / f"{size}.md").read_text(),
    }


# ------------------------------------------------------------------------------------------ step c: finetune
def step_finetune(args, deadline: float, work: Path) -> dict:
    out = work / "finetune"
    model, data = args.bundle / "finetune" / "model", args.bundle / "finetune" / "data"
    if not (model / "model.pt").exists():
        return {"error": f"no {model}/model.pt: build the bundle (make gpu-bundle) or pass --bundle"}
    cmd = [sys.executable, REPO / "scripts" / "sweep.py", "--data-root", data, "--pretrained", model]
    cmd += ["--output-dir", out, "--tasks", "RTE", "--methods", args.finetune_methods, "--seeds", "1", "--no-report"]
    cmd += ["--lr", str(args.finetune_lr), "--batch-size", "16", "--warmup-ratio", "0.06", "--quiet"]
    if args.cpu:  # 2 updates, 2 validation batches: MiniLM forwards take seconds on a CPU core
        cmd += ["--cpu", "--max-update", "2", "--log-interval", "1", "--threads", "1"]
        cmd += ["--extra-args", "--max-valid-steps 2"]
    else:
        cmd += ["--max-update", str(args.finetune_updates), "--log-interval", "20", "--extra-args", FP16_FLAGS]
    run = run_bounded(cmd, deadline, work / "finetune.log", child_env(args.cpu))
    from robustft_experiments.report import parse_valid_records

    runs = []
    for method in args.finetune_methods.split(","):
        run_dir = out / "runs" / "RTE" / method / "seed1"
        text = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").exists() else ""
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        valid = parse_valid_records(text)
        scales = re.findall(r"\| loss_scale ([0-9.eE+-]+)", text)
        runs.append(
            {
                "method": method,
                "status": status.get("status", "incomplete" if text else "not started"),
                "seconds": status.get("seconds"),
                "dev_accuracy": [r.get("accuracy") for r in valid],
                "dev_accuracy_best": max((r["accuracy"] for r in valid if "accuracy" in r), default=None),
                "num_updates": [r.get("num_updates") for r in valid],
                "last_loss_scale": float(scales[-1]) if scales else None,
            }
        )
    return {**run, "runs": runs, "command": " ".join(str(c) for c in cmd[1:])}


STEPS = {"fp16": step_fp16, "bench": step_bench, "finetune": step_finetune}


# ------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    env = result.get("install", {}).get("environment", {})
    lines = [
        f"# GPU check, {result['date']}",
        "",
        f"device {env.get('device', result['mode'])}, torch {env.get('torch', '?')}, python {env.get('python', '?')}, "
        f"commit {result['commit']} (bundle built {result['bundle'].get('created')}), "
        f"{result['elapsed_s']:.0f} s of a {result['budget_s']} s budget",
        "",
    ]
    inst = result.get("install", {})
    if inst.get("stale_plugin_files"):
        lines += [f"**The bundle's plugin differs from the working tree in {inst['stale_plugin_files']}.**", ""]
    for name, step in result["steps"].items():
        head = f"## {name}: {step.get('seconds', 0):.0f} s" + (
            " (stopped at its deadline)" if step.get("timed_out") else ""
        )
        lines += [head, ""]
        if "error" in step:
            lines += ["```", step["error"], "```", ""]
        if name == "fp16" and step.get("runs"):
            lines += [
                "| method | mode | ok | updates | overflows | loss first->last | final loss scale | noise (mean) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in step["runs"]:
                loss = r["loss_first_last"]
                loss_text = f"{loss[0]:.3f}->{loss[1]:.3f}" if loss else ""
                noise = ", ".join(f"{k} {v:.4g}" for k, v in r["noise_mean"].items())
                ok = "yes" if r["ok"] else "NO: " + "; ".join(r["problems"])
                lines.append(
                    f"| {r['method']} | {r['mode']} | {ok} | {r['updates']} | {r['overflows']} | {loss_text} "
                    f"| {r['final_loss_scale']} | {noise} |"
                )
            lines.append("")
        if name == "bench" and step.get("table"):
            lines += [step["table"], ""]
        if name == "finetune" and step.get("runs"):
            lines += [
                "| method | status | dev accuracy per validation | best | last loss scale |",
                "|---|---|---|---|---|",
            ]
            for r in step["runs"]:
                acc = ", ".join(f"{a:.1f}" for a in r["dev_accuracy"] if a is not None)
                best = "" if r["dev_accuracy_best"] is None else f"{r['dev_accuracy_best']:.1f}"
                lines.append(f"| {r['method']} | {r['status']} | {acc} | {best} | {r['last_loss_scale']} |")
            lines += ["", f"command: `sweep.py {step.get('command', '')}`", ""]
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict) -> None:
    result["elapsed_s"] = round(time.time() - result["started_at"], 1)
    for name, text in (("gpu_check.json", json.dumps(result, indent=1) + "\n"), ("gpu_check.md", markdown(result))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def pack_logs(work: Path, out: Path) -> None:
    """Every step's log and raw result file (not checkpoints or data) into OUT/gpu_check-logs.tar.gz."""
    wanted = [p for p in sorted(work.rglob("*")) if p.is_file() and p.suffix in (".log", ".json", ".md")]
    tmp = out / "gpu_check-logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in wanted:
            if path.stat().st_size < 8 << 20:
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(out / "gpu_check-logs.tar.gz")


# ------------------------------------------------------------------------------------------ main
def scratch_root() -> str | None:
    """/dev/shm when it can hold a few roberta-base checkpoints with optimizer state (~1.5 GB each, written
    and deleted run by run): memory is faster than the disk; a container's 64 MB /dev/shm is not enough."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > SHM_MIN_FREE else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device)")
    p.add_argument("--cpu", action="store_true", help="CPU mode: tiny shapes, a few updates")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the carry bundle (make gpu-bundle)")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="where the bundle's wheels are installed")
    inst = p.add_mutually_exclusive_group()
    inst.add_argument("--install", dest="install", action="store_true", default=None, help="(default on the GPU)")
    inst.add_argument("--no-install", dest="install", action="store_false", help="(default in CPU mode)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--budget-s", type=int, help="whole check, install included (default: sum of the step budgets)")
    p.add_argument("--work-dir", type=Path, help="checkpoints and logs (default: /dev/shm when there, else /tmp)")
    p.add_argument("--fp16-methods", help="fp16_check --methods (default: every method it knows)")
    p.add_argument("--fp16-updates", type=int, default=200)
    p.add_argument("--bench-only", help="benchmarks/run.py --only (default: every configuration)")
    p.add_argument("--finetune-methods", default="vanilla,r3f")
    p.add_argument("--finetune-updates", type=int, default=468, help="468 = 3 epochs of RTE at batch 16")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--started-at", type=float, help=argparse.SUPPRESS)  # set by the re-run after the install
    p.add_argument("--install-record", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.install = (not args.cpu) if args.install is None else args.install
    unknown = [s for s in args.steps.split(",") if s and s not in STEPS]
    if unknown:
        p.error(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = args.started_at or time.time()
    budgets = CPU_BUDGETS if args.cpu else GPU_BUDGETS
    total = args.budget_s or sum(budgets.values())
    args.out.mkdir(parents=True, exist_ok=True)
    args.bundle = args.bundle.resolve()
    if args.work_dir:
        work = args.work_dir
    elif args.install_record:  # the run after the install: the folder the install made
        work = args.install_record.parent
    else:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=scratch_root()))
    work.mkdir(parents=True, exist_ok=True)
    if args.install:  # step 0, then this script again with the bundle on PYTHONPATH
        try:
            record = install(args.bundle, args.site, work)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            record = {"error": str(err)}
        (work / "install.json").write_text(json.dumps(record | {"seconds": round(time.time() - started, 1)}))
        if "error" in record:
            log(record["error"])
        else:
            argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--install"]
            argv += ["--no-install", "--started-at", str(started), "--install-record", str(work / "install.json")]
            env = dict(os.environ, PYTHONPATH=python_path(args.site))
            os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    manifest_file = args.bundle / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    install_record = json.loads(args.install_record.read_text()) if args.install_record else None
    if install_record is None and args.install:
        install_record = json.loads((work / "install.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "cpu" if args.cpu else "gpu",
        "commit": manifest.get("commit", "unknown (no bundle manifest)"),
        "bundle": {k: manifest.get(k) for k in ("created", "commit", "dirty_paths", "total_bytes", "wheels")},
        "budget_s": total,
        "started_at": started,
        "install": install_record or {"skipped": "--no-install: the running interpreter's packages"},
        "steps": {},
    }
    if install_record is None:
        try:
            result["install"]["environment"] = environment(script=LIGHT_ENV)
        except RuntimeError as err:
            result["install"]["error"] = str(err)
    device = result["install"].get("environment", {}).get("device", "unknown")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")
    result["suggested_results_dir"] = (
        f"benchmarks/results/gpu/{time.strftime('%Y-%m-%d')}_{slug}_{result['commit'][:10]}"
    )
    if "error" in result["install"]:
        write_results(args.out, result)
        return 1
    deadline = started + budgets["install"]
    for name in [s for s in STEPS if s in args.steps.split(",")]:
        deadline = min(deadline + budgets[name], started + total)
        if time.time() >= deadline - 5:
            result["steps"][name] = {"error": "no time left in the budget", "seconds": 0}
            continue
        log(f"step {name}: until +{deadline - started:.0f} s")
        result["steps"][name] = STEPS[name](args, deadline, work)
        log(f"step {name}: {result['steps'][name].get('seconds', 0):.0f} s")
        write_results(args.out, result)
    write_results(args.out, result)
    pack_logs(work, args.out)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = all("error" not in s and not s.get("returncode") for s in result["steps"].values())
    log(f"done in {time.time() - started:.0f} s: {args.out}/gpu_check.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
