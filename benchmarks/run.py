"""Cost of every robustft method against vanilla fine-tuning, measured side by side.

For every configuration the real fairseq pieces are built (`options.parse_args_and_arch` ->
`convert_namespace_to_omegaconf` -> `tasks.setup_task` -> `task.build_model` / `build_criterion` ->
`fairseq.trainer.Trainer`) and `trainer.train_step([sample])` is timed on one fixed synthetic batch.

Every method configuration takes its flags from the method registry (`robustft_common.methods`); the
baselines `vanilla` / `adamax` are the registry's baselines with fairseq's own `sentence_prediction` loss
(what a user has without the plugin). Besides the train step, `--optimizer-steps N` times
`optimizer.step()` alone on the last step's gradients, and `--layers/--dim/--batch/--seq-len` change the
shape of the named size (e.g. HyPe's cost at another width).

Process layout (see benchmarks/README.md):
  * this script, run without `--worker`, is the orchestrator (it reads the method registry, so it imports
    fairseq, but builds no model);
  * worker `robustft` (one process, `--user-dir robustft`) runs all of our configurations;
  * worker `reference` (one process, `--user-dir fairseq/examples/rxf/rxf_src`) runs fairseq's own R3F and
    a vanilla run of its own: the two `sentence_prediction_r3f` registrations cannot share a process.
The orchestrator interleaves configurations round-robin across both workers: each round visits every
configuration once (the order rotates per round) and runs one *block*: build, warm-up steps, timed steps,
free. Only one configuration is alive per worker at a time, so roberta-base fits in a few GB, and the
block's peak memory is the configuration's own: CPU = high-water RSS (VmHWM, reset through
/proc/self/clear_refs before the block) minus RSS before the build; CUDA = max_memory_allocated minus
memory_allocated before the build (after reset_peak_memory_stats).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from robustft_common.methods import method_flags
from robustft_testing import shapes
from robustft_testing.shapes import TINY_ENCODER_DECODER

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_FD_ENV = "ROBUSTFT_BENCH_FD"


# ----------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    roberta: tuple  # model flags of the sentence-prediction configurations
    bart: tuple  # model flags of the Hyperdecoder configurations
    vocab: int  # dictionary size incl. fairseq's 4 specials (+ <mask> for RoBERTa), like GPT-2 BPE
    batch: int
    seq_len: int  # sentence prediction: every sentence this long (no padding: fixed shape)
    tgt_len: int  # Hyperdecoder targets (GLUE text-to-text answers are a few tokens)
    device: str  # cpu | cuda
    rounds: int
    warmup: int
    steps: int
    # BART summarisation configurations (issue 16): the architecture flags and a CNN/DM-like shape
    summ_arch: tuple = ("--arch", "bart_base")
    summ_src_len: int = 512
    summ_tgt_len: int = 64


TINY_ROBERTA = (*shapes.TINY_ROBERTA, "--max-positions", "128")

SIZES: dict[str, Size] = {
    "tiny": Size(
        TINY_ROBERTA,
        ("--arch", "hyperdecoder_bart_tiny"),
        vocab=1000,
        batch=16,
        seq_len=64,
        tgt_len=8,
        device="cpu",
        rounds=5,
        warmup=2,
        steps=5,
        summ_arch=("--arch", "bart_base", *TINY_ENCODER_DECODER),
        summ_src_len=64,
        summ_tgt_len=16,
    ),
    "base": Size(
        ("--arch", "roberta_base", "--max-positions", "512"),
        ("--arch", "hyperdecoder_bart_base"),
        vocab=50265,
        batch=4,
        seq_len=128,
        tgt_len=8,
        device="cpu",
        rounds=2,
        warmup=1,
        steps=2,
    ),
    "large": Size(
        ("--arch", "roberta_large", "--max-positions", "512"),
        ("--arch", "hyperdecoder_bart_large"),
        vocab=50265,
        batch=16,
        seq_len=256,
        tgt_len=8,
        device="cuda",
        rounds=5,
        warmup=3,
        steps=10,
        summ_arch=("--arch", "bart_large"),
        summ_src_len=1024,
        summ_tgt_len=128,
    ),
}


# ----------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    name: str
    group: str  # worker process: robustft | reference
    kind: str  # sp (sentence_prediction) | t2t (hyperdecoder_glue) | s2s (BART summarisation, task translation)
    flags: tuple
    what: str
    baseline: str | None = None  # the configuration it is compared with besides vanilla
    target: float | None = None  # max ratio to `baseline` (issue #9, item 4)
    # PatsAdamax.cpu_chunk_numel override (0 = the flat kernels on CPU too; None = the optimizer's default)
    pats_cpu_chunk: int | None = None
    on_demand: bool = False  # an implementation comparison: runs only when named in --only
    # ChildTuning-D: time its Fisher pass over this many copies of the batch before the block (reported separately)
    fisher_batches: int = 0
    memory_target: float | None = None  # max ratio of peak memory to `baseline` (issue 16, item 5)


ADAM = ("--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-6")  # Hyperdecoder configs


def registry(method: str, overrides: Mapping[str, str | None] | None = None) -> tuple:
    """The method's flags from the method registry (its R3F flags are the reference plugin's names too)."""
    return tuple(method_flags(method, overrides))


def stock(method: str, overrides: Mapping[str, str | None] | None = None) -> tuple:
    """A method's registry flags with fairseq's own `sentence_prediction` loss in place of the plugin's
    (baselines, optimizer-only methods: the reference process knows no other criterion)."""
    return registry(method, {"--criterion": "sentence_prediction", "--hype-type": None, **(overrides or {})})


# HyPe's recipe turns dropout off; kept on here so that the ratio is the cost of the noise alone
KEEP_DROPOUT = {"--dropout": None}
# Mixout's recipe turns dropout off too: kept on, so that the ratio is the cost of the mixing alone
MIXOUT_KEEP_DROPOUT = {"--dropout": None, "--attention-dropout": None}

CONFIGS: list[Config] = [
    Config("vanilla", "robustft", "sp", stock("vanilla"), "sentence_prediction + adam (registry vanilla)"),
    Config(
        "adamax",
        "robustft",
        "sp",
        stock("vanilla_adamax"),
        "sentence_prediction + fairseq adamax (registry vanilla_adamax)",
        baseline="vanilla",
    ),
    Config(
        "r3f",
        "robustft",
        "sp",
        registry("r3f"),
        "sentence_prediction_r3f (registry r3f)",
        baseline="vanilla",
        target=2.0,
    ),
    Config(
        "r4f",
        "robustft",
        "sp",
        registry("r4f"),
        "registry r4f: r3f + spectral-norm head (dense, out_proj)",
        baseline="vanilla",
    ),
    Config(
        "hype",
        "robustft",
        "sp",
        registry("hype_n", KEEP_DROPOUT),
        "hype_sentence_prediction (registry hype_n: HyPe-N, eps 1e-5), dropout kept",
        baseline="vanilla",
        target=1.03,
    ),
    Config(
        "hype_r3f",
        "robustft",
        "sp",
        registry("hype_r3f", KEEP_DROPOUT),
        "sentence_prediction_r3f + HyPe-N (registry hype_r3f), dropout kept",
        baseline="vanilla",
    ),
    Config(
        "rdrop",
        "robustft",
        "sp",
        registry("rdrop"),
        "sentence_prediction_rdrop, alpha 1 (registry rdrop): two passes",
        baseline="vanilla",
        target=2.0,
    ),
    Config(
        "neftune",
        "robustft",
        "sp",
        registry("neftune"),
        "sentence_prediction_neftune, alpha 5 (registry neftune)",
        baseline="vanilla",
        target=1.02,
    ),
    Config(
        "mixout",
        "robustft",
        "sp",
        registry("mixout", MIXOUT_KEEP_DROPOUT),
        "registry mixout (p 0.9 on every encoder linear), dropout kept",
        baseline="vanilla",
        target=1.15,
    ),
    Config(
        "adamax_pats",
        "robustft",
        "sp",
        stock("pats"),
        "sentence_prediction + adamax_pats (registry pats)",
        baseline="adamax",
        target=1.08,
    ),
    Config(
        "adamax_pats_noise0",
        "robustft",
        "sp",
        stock("pats", {"--pats-noise": "0"}),
        "adamax_pats --pats-noise 0: its Adamax path alone",
        baseline="adamax",
        on_demand=True,
    ),
    Config(
        "adamax_pats_flat",
        "robustft",
        "sp",
        stock("pats"),
        "adamax_pats without the CPU-chunked noise path (pats_src/cpu_chunked.py)",
        baseline="adamax",
        pats_cpu_chunk=0,
        on_demand=True,
    ),
    Config(
        "adamax_sage",
        "robustft",
        "sp",
        stock("sage"),
        "sentence_prediction + adamax_sage (registry sage)",
        baseline="adamax",
    ),
    Config(
        "childtuning_f",
        "robustft",
        "sp",
        stock("childtuning_f"),
        "sentence_prediction + adam_childtuning F, p 0.3 (registry childtuning_f)",
        baseline="vanilla",
        target=1.10,
    ),
    Config(
        "childtuning_d",
        "robustft",
        "sp",
        stock("childtuning_d"),
        "sentence_prediction + adam_childtuning D, p 0.3 (registry childtuning_d); Fisher pass timed apart",
        baseline="vanilla",
        fisher_batches=4,
    ),
    Config(
        "smart",
        "robustft",
        "sp",
        ("--max-update", "1000") + registry("smart"),  # the teacher's momentum switches at 10% of it
        "sentence_prediction_smart, 1 ascent step, Bregman teacher (registry smart)",
        baseline="vanilla",
        # (3 + 3S) / 3 forward-pass equivalents (R3F paper, BP = 2 FP) counting S = T + 1 = 2 adversarial
        # passes: mt-dnn's T = 1 ascent step (FP + backward to delta) and the final adversarial FP + BP; + 1
        # no-grad teacher FP (Bregman term): (3 + 6 + 1) / 3 = 3.33, + 10 %. Like FreeLB's K + 1 passes
        # = 3 + 3K; the paper's 6 for S = 1 leaves one of the two adversarial passes out
        target=3.67,
    ),
    Config(
        "smart_no_teacher",
        "robustft",
        "sp",
        registry("smart", {"--smart-mu": "0"}),
        "sentence_prediction_smart without the Bregman term (--smart-mu 0: no teacher pass)",
        baseline="vanilla",
        target=3.3,  # (3 + 3 * 2) / 3 = 3.0 (see smart), + 10 %
        on_demand=True,
    ),
    Config(
        "freelb",
        "robustft",
        "sp",
        registry("freelb"),
        "sentence_prediction_freelb, K = 3 ascent steps = 4 passes (registry freelb)",
        baseline="vanilla",
        target=4.4,  # (3 + 3K) / 3 forward-pass equivalents with K = 3 (R3F paper's 3 + 3S), + 10%
    ),
    Config(
        "single_adapter",
        "robustft",
        "t2t",
        ("--encoder-adapter", "manual", "--decoder-adapter", "manual"),
        "hyperdecoder_bart, manual encoder + manual decoder adapters",
    ),
    Config(
        "hyperdecoder",
        "robustft",
        "t2t",
        ("--encoder-adapter", "manual", "--decoder-adapter", "generated"),
        "hyperdecoder_bart, manual encoder + generated decoder adapters",
        baseline="single_adapter",
        target=1.15,
    ),
    Config(
        "bart_ls",
        "robustft",
        "s2s",
        registry("vanilla_seq2seq"),
        "BART summarisation: fairseq's label_smoothed_cross_entropy (registry vanilla_seq2seq)",
    ),
    Config(
        "bart_r3f",
        "robustft",
        "s2s",
        registry("r3f_seq2seq"),
        "label_smoothed_cross_entropy_r3f, chunked vocabulary KL (registry r3f_seq2seq)",
        baseline="bart_ls",
        target=2.1,
        memory_target=2.5,
    ),
    Config("ref_vanilla", "reference", "sp", stock("vanilla"), "sentence_prediction + adam, in the reference process"),
    Config(
        "ref_r3f",
        "reference",
        "sp",
        registry("r3f"),
        "fairseq examples/rxf sentence_prediction_r3f, same flags",
        baseline="ref_vanilla",
    ),
]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}

SHAPE_OPTIONS = ("layers", "dim", "batch", "seq_len")


def shape_overrides(opts) -> dict[str, int]:
    return {k: getattr(opts, k) for k in SHAPE_OPTIONS if getattr(opts, k, None)}


def size_for(opts) -> Size:
    """The named size with --layers/--dim (RoBERTa configurations) and --batch/--seq-len (all) applied."""
    size, shape = SIZES[opts.size], shape_overrides(opts)
    roberta = list(size.roberta)
    if "layers" in shape:
        roberta += ["--encoder-layers", str(shape["layers"])]
    if "dim" in shape:
        d = shape["dim"]
        roberta += [
            "--encoder-embed-dim",
            str(d),
            "--encoder-ffn-embed-dim",
            str(4 * d),
            "--encoder-attention-heads",
            str(max(1, d // 64)),
        ]
    if "seq_len" in shape:
        positions = int(roberta[roberta.index("--max-positions") + 1]) if "--max-positions" in roberta else 512
        roberta += ["--max-positions", str(max(positions, shape["seq_len"]))]
    return replace(
        size, roberta=tuple(roberta), batch=shape.get("batch", size.batch), seq_len=shape.get("seq_len", size.seq_len)
    )


def result_stem(opts) -> str:
    """Output file stem: the size name, plus the shape options when any is given (tiny-layers1-dim32)."""
    return "-".join([opts.size] + [f"{k.replace('_', '')}{v}" for k, v in shape_overrides(opts).items()])


def reference_user_dir() -> Path:
    """fairseq's own R3F plugin inside the installed fairseq (found without importing fairseq)."""
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fairseq is not installed in this interpreter")
    path = Path(list(spec.submodule_search_locations)[0]) / "examples" / "rxf" / "rxf_src"
    if not path.is_dir():
        raise SystemExit(f"fairseq's reference R3F plugin is missing: {path}")
    return path


def user_dir(group: str) -> Path:
    return REPO / "robustft" if group == "robustft" else reference_user_dir()


def config_argv(cfg: Config, size: Size, data: Path) -> list[str]:
    """The fairseq-train command line of one configuration (printed into the results too)."""
    common = [
        "--user-dir",
        str(user_dir(cfg.group)),
        "--seed",
        "1",
        "--lr",
        "1e-5",
        "--clip-norm",
        "0.0",
        "--dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
        "--batch-size",
        str(size.batch),
        "--required-batch-size-multiple",
        "1",
        "--num-workers",
        "0",
        "--log-format",
        "none",
    ]
    if size.device == "cpu":
        common += ["--cpu"]
    else:  # the RoBERTa GLUE recipe's fp16 flags; non-flat fp32 master params for every optimizer
        # (PATS/SAGE and fairseq's adamax need per-tensor parameters under --fp16)
        common += [
            "--fp16",
            "--fp16-init-scale",
            "4",
            "--threshold-loss-scale",
            "1",
            "--fp16-scale-window",
            "128",
            "--fp16-no-flatten-grads",
        ]
    if cfg.kind == "sp":
        return [
            str(data / "sp"),
            "--task",
            "sentence_prediction",
            "--num-classes",
            "2",
            "--init-token",
            "0",
            "--separator-token",
            "2",
            "--weight-decay",
            "0.1",
            *size.roberta,
            *common,
            *cfg.flags,
        ]
    if cfg.kind == "s2s":  # BART's summarisation recipe (scripts/recipes/seq2seq.sh), registry flags last
        return [
            str(data / "s2s"),
            "--task",
            "translation",
            "--source-lang",
            "source",
            "--target-lang",
            "target",
            "--max-source-positions",
            str(max(1024, size.summ_src_len)),
            "--max-target-positions",
            str(max(1024, size.summ_tgt_len)),
            "--share-all-embeddings",
            "--share-decoder-input-output-embed",
            *size.summ_arch,
            *common,
            *cfg.flags,
        ]
    return [
        str(data / "t2t"),
        "--task",
        "hyperdecoder_glue",
        "-s",
        "src",
        "-t",
        "tgt",
        *size.bart,
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        *ADAM,
        "--weight-decay",
        "0.01",
        *common,
        *cfg.flags,
    ]


def write_dictionaries(data: Path, vocab: int) -> None:
    """Dictionaries of `vocab` entries for both tasks (the batch itself is synthesised in the worker)."""
    sp_words = vocab - 5  # + <s> <pad> </s> <unk> + <mask> (added by sentence_prediction)
    t2t_words = vocab - 4
    (data / "sp" / "input0").mkdir(parents=True, exist_ok=True)
    (data / "sp" / "label").mkdir(parents=True, exist_ok=True)
    (data / "t2t").mkdir(parents=True, exist_ok=True)
    (data / "sp" / "input0" / "dict.txt").write_text("".join(f"t{i} 1\n" for i in range(sp_words)))
    (data / "sp" / "label" / "dict.txt").write_text("0 1\n1 1\n")
    for lang in ("src", "tgt"):
        (data / "t2t" / f"dict.{lang}.txt").write_text("".join(f"t{i} 1\n" for i in range(t2t_words)))
    (data / "s2s").mkdir(parents=True, exist_ok=True)
    for lang in ("source", "target"):
        (data / "s2s" / f"dict.{lang}.txt").write_text("".join(f"t{i} 1\n" for i in range(t2t_words)))


# ----------------------------------------------------------------------------------------- worker
class Worker:
    """Runs blocks of one configuration at a time inside this process (imports fairseq)."""

    def __init__(self, size: Size, data: Path, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.size = size
        self.data = data
        self.cuda = size.device == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("this size needs a CUDA device (torch.cuda.is_available() is False)")
        self._trim = _malloc_trim()
        self.import_rss_mb = _proc_status_mb("VmRSS")

    def sample(self, task, kind: str):
        torch = self.torch
        size = self.size
        gen = torch.Generator().manual_seed(1234)
        dictionary = task.source_dictionary
        # ordinary words only: no specials, no <mask>
        low, high = dictionary.nspecial, len(dictionary) - (1 if kind == "sp" else 0)
        bsz = size.batch

        def words(length):
            return torch.randint(low, high, (bsz, length), generator=gen)

        def column(value):
            return torch.full((bsz, 1), value, dtype=torch.long)

        if kind == "sp":
            src = torch.cat([column(dictionary.bos()), words(size.seq_len - 2), column(dictionary.eos())], 1)
            return {
                "id": torch.arange(bsz),
                "nsentences": bsz,
                "ntokens": src.numel(),
                "net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), src.size(1))},
                "target": torch.randint(0, 2, (bsz,), generator=gen),
            }
        eos = dictionary.eos()
        src_len, tgt_len = (size.summ_src_len, size.summ_tgt_len) if kind == "s2s" else (size.seq_len, size.tgt_len)
        src = torch.cat([words(src_len - 1), column(eos)], 1)
        tgt = torch.cat([words(tgt_len - 1), column(eos)], 1)
        prev = torch.cat([column(eos), tgt[:, :-1]], 1)
        return {
            "id": torch.arange(bsz),
            "nsentences": bsz,
            "ntokens": tgt.numel(),
            "net_input": {
                "src_tokens": src,
                "src_lengths": torch.full((bsz,), src.size(1)),
                "prev_output_tokens": prev,
            },
            "target": tgt,
        }

    def build(self, cfg: Config):
        from fairseq import options, tasks, utils
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq.trainer import Trainer

        argv = config_argv(cfg, self.size, self.data)
        args = options.parse_args_and_arch(options.get_training_parser(), argv)
        fcfg = convert_namespace_to_omegaconf(args)
        utils.set_torch_seed(fcfg.common.seed)
        task = tasks.setup_task(fcfg.task)
        model = task.build_model(fcfg.model)
        criterion = task.build_criterion(fcfg.criterion)
        trainer = Trainer(fcfg, task, model, criterion)
        if cfg.pats_cpu_chunk is not None:
            inner = trainer.optimizer  # builds it now (fairseq builds it lazily at the first step)
            while not hasattr(inner, "cpu_chunk_numel"):  # fp16 wrapper -> fairseq optimizer -> torch
                inner = inner.optimizer
            inner.cpu_chunk_numel = cfg.pats_cpu_chunk
        return trainer, self.sample(task, cfg.kind)

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def fisher_pass(self, trainer, sample, batches: int) -> dict:
        """ChildTuning-D's Fisher pass over `batches` copies of the batch (the mask the timed steps then use)."""
        inner = trainer.optimizer  # builds it (fairseq builds it lazily)
        while not hasattr(inner, "childtuning"):  # fp16 wrappers -> the fairseq optimizer
            inner = getattr(inner, "fp32_optimizer", None) or inner.wrapped_optimizer
        prepared, _ = trainer._prepare_sample(sample)
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        inner.childtuning.masks = inner.childtuning.compute_fisher_masks(batches=[prepared] * batches)
        self._sync()
        return {
            "fisher_batch_s": (time.perf_counter() - start) / batches,
            "fisher_batch_cpu_s": (time.process_time() - cpu_start) / batches,
        }

    def block(self, cfg: Config, warmup: int, steps: int, opt_steps: int = 0) -> dict:
        import gc

        from fairseq.logging import metrics

        torch = self.torch
        gc.collect()
        self._trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        rss_before = _proc_status_mb("VmRSS")
        _reset_rss_high_water()
        start = time.perf_counter()
        trainer, sample = self.build(cfg)
        build_s = time.perf_counter() - start
        fisher = self.fisher_pass(trainer, sample, cfg.fisher_batches) if cfg.fisher_batches else {}
        metrics.reset()
        skipped, losses, times, cpu_times = 0, [], [], []
        for i in range(warmup + steps):
            self._sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            log = trainer.train_step([sample])
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                if log is None:  # fp16 overflow: the update was skipped
                    skipped += 1
                else:
                    losses.append(float(log.get("loss", float("nan"))))
        opt_times = []
        for _ in range(opt_steps):  # optimizer.step() alone, on the gradients the last train step left
            self._sync()
            start = time.perf_counter()
            trainer.optimizer.step()
            self._sync()
            opt_times.append(time.perf_counter() - start)
        result = {
            "config": cfg.name,
            "times_s": times,
            "cpu_times_s": cpu_times,
            "opt_times_s": opt_times,
            "build_s": build_s,
            "skipped_steps": skipped,
            "loss": losses[-1] if losses else None,
            "rss_before_mb": rss_before,
            "peak_rss_mb": _proc_status_mb("VmHWM"),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in trainer.model.parameters()),
            **fisher,
        }
        result["peak_rss_over_before_mb"] = result["peak_rss_mb"] - rss_before
        if self.cuda:
            result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        del trainer, sample, log
        metrics.reset()
        return result


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_rss_high_water() -> None:
    # Linux: writing 5 resets VmHWM to the current RSS (so each block sees only its own peak)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _malloc_trim():
    """glibc malloc_trim(0): give freed heap back so RSS before a block excludes the previous block."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except OSError:
        return lambda: None


def worker_main(opts) -> None:
    """Serve JSON commands on stdin, one block each; answers go to the protocol fd (stdout is for logs)."""
    proto = os.fdopen(int(os.environ[PROTOCOL_FD_ENV]), "w", buffering=1)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    size = size_for(opts)
    worker = Worker(size, Path(opts.data), opts.threads)
    device_name = (
        worker.torch.cuda.get_device_name()
        if worker.cuda
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    )
    proto.write(
        json.dumps(
            {
                "ready": True,
                "import_rss_mb": worker.import_rss_mb,
                "device_name": device_name,
                "torch": worker.torch.__version__,
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = worker.block(
                CONFIG_BY_NAME[request["config"]], request["warmup"], request["steps"], request.get("opt_steps", 0)
            )
        except Exception as err:  # report and keep serving; the orchestrator decides
            import traceback

            traceback.print_exc()
            answer = {"config": request["config"], "error": f"{type(err).__name__}: {err}"}
        proto.write(json.dumps(answer) + "\n")


class WorkerProcess:
    def __init__(self, group: str, opts, log_path: Path):
        read_fd, write_fd = os.pipe()
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(opts.threads), **{PROTOCOL_FD_ENV: str(write_fd)}
        )
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                group,
                "--size",
                opts.size,
                "--data",
                str(opts.data),
                "--threads",
                str(opts.threads),
                *[a for k, v in shape_overrides(opts).items() for a in (f"--{k.replace('_', '-')}", str(v))],
            ],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            pass_fds=(write_fd,),
            cwd=str(REPO),
        )
        os.close(write_fd)
        self.answers = os.fdopen(read_fd)
        self.group, self.log_path = group, log_path
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.answers.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(
                f"worker {self.group} exited {self.proc.returncode}; log: {self.log_path}\n"
                + self.log_path.read_text()[-4000:]
            )
        return json.loads(line)

    def run(self, config: str, warmup: int, steps: int, opt_steps: int = 0) -> dict:
        self.proc.stdin.write(
            json.dumps({"config": config, "warmup": warmup, "steps": steps, "opt_steps": opt_steps}) + "\n"
        )
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


# ----------------------------------------------------------------------------------------- report
def summarize(blocks: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for name, runs in blocks.items():
        times = [t for run in runs for t in run["times_s"]]
        cpu_times = [t for run in runs for t in run["cpu_times_s"]]
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        rows[name] = {
            "median_ms": 1000 * statistics.median(times),
            "p25_ms": 1000 * q[0],
            "p75_ms": 1000 * q[2],
            "cpu_median_ms": 1000 * statistics.median(cpu_times),
            "n_steps": len(times),
            "round_medians_ms": [1000 * statistics.median(r["times_s"]) for r in runs],
            # median over blocks: robust to a block that pays a one-off allocation; max kept too
            "peak_rss_over_before_mb": statistics.median(r["peak_rss_over_before_mb"] for r in runs),
            "peak_rss_over_before_mb_max": max(r["peak_rss_over_before_mb"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "rss_before_mb": [r["rss_before_mb"] for r in runs],
            "params": runs[0]["params"],
            "trainable_params": runs[0]["trainable_params"],
            "skipped_steps": sum(r["skipped_steps"] for r in runs),
            "last_loss": runs[-1]["loss"],
        }
        opt_times = [t for run in runs for t in run.get("opt_times_s", [])]
        if opt_times:
            rows[name]["opt_step_median_ms"] = 1000 * statistics.median(opt_times)
        if "cuda_peak_mb" in runs[0]:
            rows[name]["cuda_peak_mb"] = statistics.median(r["cuda_peak_mb"] for r in runs)
            rows[name]["cuda_peak_mb_max"] = max(r["cuda_peak_mb"] for r in runs)
        if "fisher_batch_s" in runs[0]:
            rows[name]["fisher_batch_ms"] = 1000 * statistics.median(r["fisher_batch_s"] for r in runs)
            rows[name]["fisher_batch_cpu_ms"] = 1000 * statistics.median(r["fisher_batch_cpu_s"] for r in runs)
    return rows


def ratios(rows: dict[str, dict]) -> None:
    """Ratio of medians to vanilla (same process) and to the configuration's own baseline; the paired
    ratio (median over rounds of round-median / baseline's round-median) is kept as a drift check."""
    for name, row in rows.items():
        cfg = CONFIG_BY_NAME[name]
        vanilla = "ref_vanilla" if cfg.group == "reference" else "vanilla"
        if cfg.kind == "sp" and vanilla in rows:
            row["x_vanilla"] = row["median_ms"] / rows[vanilla]["median_ms"]
            row["cpu_x_vanilla"] = row["cpu_median_ms"] / rows[vanilla]["cpu_median_ms"]
        if cfg.baseline and cfg.baseline in rows:
            base = rows[cfg.baseline]
            row["baseline"] = cfg.baseline
            row["x_baseline"] = row["median_ms"] / base["median_ms"]
            row["cpu_x_baseline"] = row["cpu_median_ms"] / base["cpu_median_ms"]
            paired = [a / b for a, b in zip(row["round_medians_ms"], base["round_medians_ms"])]
            row["x_baseline_paired"] = statistics.median(paired)
            if "opt_step_median_ms" in row and "opt_step_median_ms" in base:
                row["opt_step_x_baseline"] = row["opt_step_median_ms"] / base["opt_step_median_ms"]
    if "ref_r3f" in rows and "vanilla" in rows:
        rows["ref_r3f"]["x_vanilla_of_robustft_process"] = rows["ref_r3f"]["median_ms"] / rows["vanilla"]["median_ms"]


def targets(rows: dict[str, dict]) -> list[dict]:
    checks = []
    for cfg in CONFIGS:
        if cfg.target is not None and cfg.name in rows and "x_baseline" in rows[cfg.name]:
            value, cpu = rows[cfg.name]["x_baseline"], rows[cfg.name]["cpu_x_baseline"]
            checks.append(
                {
                    "config": cfg.name,
                    "check": f"{cfg.name} <= {cfg.target:g}x {cfg.baseline}",
                    "value": value,
                    "met": value <= cfg.target,
                    "cpu_value": cpu,
                    "cpu_met": cpu <= cfg.target,
                }
            )
        if cfg.memory_target is not None and cfg.name in rows and cfg.baseline in rows:
            key = "cuda_peak_mb" if "cuda_peak_mb" in rows[cfg.name] else "peak_rss_over_before_mb"
            value = rows[cfg.name][key] / rows[cfg.baseline][key]
            checks.append(
                {
                    "config": f"{cfg.name}:memory",
                    "check": f"{cfg.name} peak memory ({key}) <= {cfg.memory_target:g}x {cfg.baseline}",
                    "value": value,
                    "met": value <= cfg.memory_target,
                }
            )
    if all(k in rows and "x_vanilla" in rows[k] for k in ("r3f", "ref_r3f")):
        ours, ref = rows["r3f"]["x_vanilla"], rows["ref_r3f"]["x_vanilla"]
        cpu_ours, cpu_ref = rows["r3f"]["cpu_x_vanilla"], rows["ref_r3f"]["cpu_x_vanilla"]
        checks.append(
            {
                "check": "r3f x vanilla <= reference R3F x its vanilla",
                "value": ours,
                "reference": ref,
                "met": ours <= ref,
                "cpu_value": cpu_ours,
                "cpu_reference": cpu_ref,
                "cpu_met": cpu_ours <= cpu_ref,
            }
        )
    return checks


def _ratio(row, key):
    wall, cpu = row.get(key), row.get("cpu_" + key)
    return "" if wall is None else f"{wall:.3f} / {cpu:.3f}"


def _verdict(check, wall_key="met", cpu_key="cpu_met"):
    word = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    return f"{word(check[wall_key])} / {word(check[cpu_key])}"


def markdown(result: dict) -> str:
    rows, meta = result["configs"], result["meta"]
    cuda = meta["device"] == "cuda"
    mem_key = "cuda_peak_mb" if cuda else "peak_rss_over_before_mb"
    mem_title = "peak CUDA MB" if cuda else "peak RSS MB"
    lines = [
        f"size `{meta['size']}` on {meta['device']} ({meta['device_name']}, torch {meta['torch']}), batch "
        f"{meta['batch']} x {meta['seq_len']} tokens (Hyperdecoder targets {meta['tgt_len']}; BART summarisation "
        f"{meta.get('summ_src_len', '-')} source / {meta.get('summ_tgt_len', '-')} target tokens), vocab "
        f"{meta['vocab']}; {meta['rounds']} rounds x {meta['steps']} timed steps after {meta['warmup']} warm-up "
        f"steps per block, {meta['threads']} thread(s); {meta['date']}",
        f"command: `{meta['command']}`",
        "",
        "Ratios are wall / CPU time (median step over median step of the comparison configuration).",
        "",
        f"| config | what | wall ms, median [p25-p75] | CPU ms | x vanilla | x baseline | {mem_title} | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = {c["config"]: c for c in result["targets"] if "config" in c}
    for cfg in CONFIGS:
        if cfg.name not in rows:
            continue
        r = rows[cfg.name]
        x_base = f"{_ratio(r, 'x_baseline')} ({r['baseline']})" if "x_baseline" in r else ""
        target = f"<= {cfg.target:g}: {_verdict(checks[cfg.name])}" if cfg.name in checks else ""
        memory = checks.get(f"{cfg.name}:memory")
        if memory:  # peak memory over the baseline's (issue 16: <= 2.5x)
            verdict = "met" if memory["met"] else "MISSED"
            target += f"; memory {memory['value']:.2f}x <= {cfg.memory_target:g}: {verdict}"
        lines.append(
            f"| `{cfg.name}` | {cfg.what} | {r['median_ms']:.1f} [{r['p25_ms']:.1f}-{r['p75_ms']:.1f}] "
            f"| {r['cpu_median_ms']:.1f} | {_ratio(r, 'x_vanilla')} | {x_base} | {r[mem_key]:.0f} "
            f"| {target} |"
        )
    ref_check = [c for c in result["targets"] if c["check"].startswith("r3f x vanilla")]
    if ref_check:
        c = ref_check[0]
        lines += [
            "",
            f"R3F vs fairseq's reference R3F, each over the vanilla of its own process (wall / CPU): "
            f"ours {c['value']:.3f} / {c['cpu_value']:.3f}, reference {c['reference']:.3f} / "
            f"{c['cpu_reference']:.3f}: not slower: {_verdict(c)}.",
        ]
        if "x_vanilla_of_robustft_process" in rows.get("ref_r3f", {}):
            lines.append(
                f"Reference R3F over our process's vanilla (wall): "
                f"{rows['ref_r3f']['x_vanilla_of_robustft_process']:.3f}."
            )
    for cfg in CONFIGS:
        r = rows.get(cfg.name, {})
        if "fisher_batch_ms" in r and "vanilla" in rows:
            wall = r["fisher_batch_ms"] / rows["vanilla"]["median_ms"]
            cpu = r["fisher_batch_cpu_ms"] / rows["vanilla"]["cpu_median_ms"]
            lines += [
                "",
                f"`{cfg.name}`'s Fisher pass (once, before update 1; not in its step times): "
                f"{r['fisher_batch_ms']:.1f} ms wall / {r['fisher_batch_cpu_ms']:.1f} ms CPU per batch = "
                f"{wall:.3f} / {cpu:.3f} x a vanilla train step; the pass covers the training set once "
                "(RTE: 2490 / 16 = 156 batches).",
            ]
    timed_opt = [c for c in CONFIGS if "opt_step_median_ms" in rows.get(c.name, {})]
    if timed_opt:
        lines += [
            "",
            f"`optimizer.step()` alone, {meta['optimizer_steps']} per block on the gradients of the block's "
            "last train step (wall ms, median; x the baseline's):",
            "",
            "| config | optimizer.step ms | x baseline |",
            "|---|---|---|",
        ]
        for cfg in timed_opt:
            r = rows[cfg.name]
            x = f"{r['opt_step_x_baseline']:.3f} ({r['baseline']})" if "opt_step_x_baseline" in r else ""
            lines.append(f"| `{cfg.name}` | {r['opt_step_median_ms']:.2f} | {x} |")
    memory = (
        "max_memory_allocated during the block minus the allocation before the build"
        if cuda
        else "high-water RSS during the block (build + all steps) minus RSS before the build"
    )
    lines += ["", f"Memory: {memory}, median over the configuration's blocks."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main
def orchestrate(opts) -> dict:
    size, stem = size_for(opts), result_stem(opts)
    names = opts.only.split(",") if opts.only else [c.name for c in CONFIGS if not c.on_demand]
    unknown = [n for n in names if n not in CONFIG_BY_NAME]
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {sorted(CONFIG_BY_NAME)}")
    rounds = opts.rounds or size.rounds
    warmup = size.warmup if opts.warmup is None else opts.warmup
    steps = opts.steps or size.steps
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="robustft-bench-")
    opts.data = Path(scratch.name)
    write_dictionaries(opts.data, size.vocab)

    groups = sorted({CONFIG_BY_NAME[n].group for n in names})
    started = time.time()
    workers = {g: WorkerProcess(g, opts, out / f"{stem}-worker-{g}.log") for g in groups}
    blocks: dict[str, list[dict]] = {n: [] for n in names}
    rounds_done, round_s = 0, 0.0
    try:
        # one discarded block per worker: first-use costs (lazy imports, allocator and thread-pool
        # growth) would otherwise land on whichever configuration happens to run first
        for group, worker in workers.items():
            first = next(n for n in names if CONFIG_BY_NAME[n].group == group)
            answer = worker.run(first, 1, 1)
            if "error" in answer:
                raise SystemExit(f"{first}: {answer['error']} (log: {worker.log_path})")
        for r in range(rounds):
            if r and opts.max_seconds and time.time() - started + round_s > opts.max_seconds:
                print(f"stopping after {r} of {rounds} rounds: --max-seconds {opts.max_seconds:g}", file=sys.stderr)
                break
            round_start = time.time()
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position per config
            for name in order:
                answer = workers[CONFIG_BY_NAME[name].group].run(name, warmup, steps, opts.optimizer_steps)
                if "error" in answer:
                    raise SystemExit(f"{name}: {answer['error']} (log: {out}/{stem}-worker-*.log)")
                blocks[name].append(answer)
                print(
                    f"round {r + 1}/{rounds} {name}: median {1000 * statistics.median(answer['times_s']):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            round_s, rounds_done = time.time() - round_start, r + 1
    finally:
        for w in workers.values():
            w.close()
        scratch.cleanup()

    rows = summarize(blocks)
    ratios(rows)
    result = {
        "meta": {
            "size": opts.size,
            "device": size.device,
            "device_name": next(iter(workers.values())).hello["device_name"],
            "torch": next(iter(workers.values())).hello["torch"],
            "batch": size.batch,
            "seq_len": size.seq_len,
            "tgt_len": size.tgt_len,
            "summ_src_len": size.summ_src_len,
            "summ_tgt_len": size.summ_tgt_len,
            "vocab": size.vocab,
            "rounds": rounds_done,
            "rounds_asked": rounds,
            "warmup": warmup,
            "steps": steps,
            "threads": opts.threads,
            "optimizer_steps": opts.optimizer_steps,
            "shape_overrides": shape_overrides(opts),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "import_rss_mb": {g: w.hello["import_rss_mb"] for g, w in workers.items()},
            "command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *sys.argv[1:]]),
        },
        "configs": rows,
        "targets": [],
        "argv": {n: config_argv(CONFIG_BY_NAME[n], size, Path("DATA")) for n in names},
        "raw_blocks": blocks,
    }
    result["targets"] = targets(rows)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results"),
        help="folder for <size>.json, <size>.md and the workers' logs",
    )
    parser.add_argument("--rounds", type=int, help="round-robin rounds (default: per size)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="start no round that would end later than this many seconds after the workers' start "
        "(estimated from the last round; the first round always runs); the JSON records the rounds run",
    )
    parser.add_argument("--steps", type=int, help="timed train steps per block (default: per size)")
    parser.add_argument("--warmup", type=int, help="untimed train steps per block (default: per size)")
    parser.add_argument(
        "--only",
        help="comma-separated configurations (default: all but the on-demand "
        "implementation comparisons, e.g. adamax_pats_flat)",
    )
    parser.add_argument(
        "--optimizer-steps",
        type=int,
        default=0,
        help="also time optimizer.step() alone this many times per block, on the gradients of "
        "the block's last train step (e.g. --only adamax,adamax_pats,adamax_pats_noise0)",
    )
    parser.add_argument("--layers", type=int, help="encoder layers of the RoBERTa configurations (overrides the size)")
    parser.add_argument("--dim", type=int, help="RoBERTa configurations' width: embed dim d, FFN 4d, d/64 heads")
    parser.add_argument("--batch", type=int, help="sentences per batch (overrides the size)")
    parser.add_argument("--seq-len", type=int, help="tokens per sentence (overrides the size)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch threads per worker (default: $OMP_NUM_THREADS or 1)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker_main(opts)
        return
    result = orchestrate(opts)
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
