"""Shared test utilities: tiny binarized datasets and real `fairseq-train` runs in subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from robustft_testing import forkserver, shapes
from robustft_testing.synthetic_data import write_sentence_prediction

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))

# 2 layers, dim 64: the tiny RoBERTa every end-to-end test trains.
TINY_ROBERTA = [*shapes.TINY_ROBERTA, "--max-positions", "64"]


# 2 + 2 layers, dim 64: the tiny encoder-decoder shape of the BART / transformer tests (add --arch); defined in
# robustft_testing.shapes so that the benchmarks' tiny size uses the same
TINY_ENCODER_DECODER = list(shapes.TINY_ENCODER_DECODER)


def _write_split(path: Path, rows):
    path.write_text("".join(r + "\n" for r in rows))


def make_sentence_prediction_data(
    root: Path,
    n_train=96,
    n_valid=32,
    regression=False,
    two_inputs=True,
    seed=0,
    label_names=("neg", "pos"),
) -> Path:
    """Binarize a learnable toy task in fairseq's RoBERTa GLUE layout (input0/, input1/, label/).

    Class = whether the first sentence starts with a word from the "positive" half of the vocab;
    the regression target is the fraction of positive words (in [0, 1], like STS-B / 5).
    """
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    raw = root / "raw"  # the text, kept beside the binarized data for tests that read it
    raw.mkdir(parents=True, exist_ok=True)
    columns = {"input0": {}, "input1": {}, "label": {}}
    for split, n in (("train", n_train), ("valid", n_valid)):
        s0, s1, labels = [], [], []
        for _ in range(n):
            a = [rng.choice(words) for _ in range(rng.randint(3, 10))]
            b = [rng.choice(words) for _ in range(rng.randint(3, 10))]
            s0.append(" ".join(a))
            s1.append(" ".join(b))
            pos = [int(w[1:]) < 20 for w in a]
            if regression:
                labels.append(f"{sum(pos) / len(pos):.4f}")
            else:
                labels.append(label_names[1] if pos[0] else label_names[0])
        for name, lines in (("input0", s0), ("input1", s1), ("label", labels)):
            _write_split(raw / f"{split}.{name}", lines)
            columns[name][split] = lines
    if not two_inputs:
        del columns["input1"]
    # in-process, byte-for-byte what `fairseq-preprocess --only-source` writes, without its start-up
    return write_sentence_prediction(root / "bin", columns, regression=regression)


def run_tool(tool: str, *args, env=None, check=True, cwd=None) -> subprocess.CompletedProcess:
    """Run a console script of the venv (fairseq-train, fairseq-preprocess, ...) and capture output."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = forkserver.run([BIN / tool, *args], env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def run_hydra_train(*overrides, cwd, config_name="rte", check=True) -> subprocess.CompletedProcess:
    """`scripts/hydra_train.py` (fairseq-hydra-train with the plugin imported first) on a finetuning yaml of
    scripts/configs/finetuning, with hydra's own outputs in `cwd`."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = forkserver.run(
        [
            sys.executable,
            REPO / "scripts" / "hydra_train.py",
            "--config-dir",
            REPO / "scripts" / "configs" / "finetuning",
            "--config-name",
            config_name,
            f"hydra.run.dir={cwd}",
            *overrides,
        ],
        env=full_env,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"hydra_train.py exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


# The tiny RoBERTa and a CPU fp32 run, as hydra overrides of scripts/configs/finetuning/*.yaml.
TINY_ROBERTA_HYDRA = [
    "+model.encoder_layers=2",
    "+model.encoder_embed_dim=64",
    "+model.encoder_ffn_embed_dim=128",
    "+model.encoder_attention_heads=2",
    "task.max_positions=64",
    "common.fp16=false",
    "common.cpu=true",
    "common.log_interval=1",
    "common.seed=1",
    "dataset.num_workers=0",
    "optimization.lr=[1e-3]",
    # the yamls' polynomial decay ends at max_update by default: fix its horizon so that a run stopped
    # early and resumed follows the same learning rates as a straight one
    "lr_scheduler.warmup_updates=0",
    "+lr_scheduler.total_num_update=1000",
]


def sentence_prediction_args(
    data: Path, save_dir: Path, *extra, criterion="sentence_prediction", num_classes=2, max_update=8
):
    """Common flags of a tiny CPU `fairseq-train --task sentence_prediction` run with json logs."""
    return [
        data,
        "--cpu",
        "--user-dir",
        REPO / "robustft",
        "--task",
        "sentence_prediction",
        "--criterion",
        criterion,
        "--num-classes",
        num_classes,
        "--init-token",
        "0",
        "--separator-token",
        "2",
        *TINY_ROBERTA,
        *tiny_run_flags(save_dir, max_update),
        *extra,
    ]


def tiny_run_flags(save_dir: Path, max_update=8) -> list:
    """Schedule, optimizer and logging flags every tiny CPU test run shares (batch 16, adam 1e-3, json logs
    every update, seed 1, legacy DDP)."""
    return [
        "--batch-size",
        "16",
        "--required-batch-size-multiple",
        "1",
        "--max-update",
        max_update,
        "--lr",
        "1e-3",
        "--optimizer",
        "adam",
        "--save-dir",
        save_dir,
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--seed",
        "1",
        "--num-workers",
        "0",
        "--no-epoch-checkpoints",
        "--ddp-backend",
        "legacy_ddp",
    ]


def write_checkpoint(data: Path, save_dir: Path, *extra) -> Path:
    """save_dir/checkpoint_last.pt of the tiny sentence-prediction model before its first update, written
    in-process by fairseq's own `checkpoint_utils.save_checkpoint` (what fairseq-train saves and resumes
    from, without starting fairseq-train); the plugin must be imported."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = [str(a) for a in sentence_prediction_args(data, save_dir, *extra)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    trainer.lr_step(0)  # builds the optimizer, as fairseq-train does before its first save
    epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=True)
    epoch_itr.next_epoch_itr(shuffle=True)  # the epoch has started, no batch drawn (fairseq_cli/train.py:271)
    checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
    return Path(save_dir) / "checkpoint_last.pt"


def train_sentence_prediction(data: Path, save_dir: Path, *extra, check=True, env=None, **args_kw):
    """One tiny CPU `fairseq-train` run (`sentence_prediction_args` + `extra`); the CompletedProcess."""
    return run_tool("fairseq-train", *sentence_prediction_args(data, save_dir, *extra, **args_kw), env=env, check=check)


def json_logs(output: str, prefix: str | None = None):
    """Parse fairseq's json log lines; `prefix` keeps only records containing keys like 'valid_'."""
    records = []
    for line in output.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            rec = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if prefix is None or any(k.startswith(prefix) for k in rec):
            records.append(rec)
    return records
