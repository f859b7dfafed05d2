"""Step-time overhead of HyPe over vanilla fine-tuning, through fairseq's real `Trainer.train_step`.

Builds the same RoBERTa twice (same init), one trained with the stock `sentence_prediction` criterion,
one with `hype_sentence_prediction` (`--hype-type normal` by default), and times full update steps
(forward, backward, optimizer) on the same synthetic batches, interleaving the two so that drift in
machine load hits both alike. Prints the median step times and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_hype_overhead.py --layers 12 --dim 768 --seq-len 64
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_trainer(criterion: str, opts, hype_flags):
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.tasks.sentence_prediction import SentencePredictionTask
    from fairseq.trainer import Trainer

    argv = ["/unused", "--user-dir", str(REPO / "hype_src"), "--task", "sentence_prediction",
            "--criterion", criterion, "--num-classes", "2", "--arch", "roberta_base", "--cpu",
            "--encoder-layers", str(opts.layers), "--encoder-embed-dim", str(opts.dim),
            "--encoder-ffn-embed-dim", str(4 * opts.dim), "--encoder-attention-heads", str(max(1, opts.dim // 64)),
            "--max-positions", str(max(opts.seq_len, 64)), "--optimizer", "adam", "--lr", "1e-5",
            "--batch-size", str(opts.batch), "--max-update", "1000", "--seed", "1"]
    if criterion == "hype_sentence_prediction":
        argv += hype_flags
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    words = Dictionary()
    for i in range(opts.vocab):
        words.add_symbol(f"w{i}")
    labels = Dictionary()
    labels.add_symbol("0")
    labels.add_symbol("1")
    task = SentencePredictionTask(cfg.task, words, labels)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def batches(opts, n):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(4, 4 + opts.vocab, (opts.batch, opts.seq_len), generator=g)
        tokens[:, 0], tokens[:, -1] = 0, 2
        out.append({"id": torch.arange(opts.batch), "nsentences": opts.batch,
                    "ntokens": tokens.numel(),
                    "net_input": {"src_tokens": tokens,
                                  "src_lengths": torch.full((opts.batch,), opts.seq_len)},
                    "target": torch.randint(0, 2, (opts.batch, 1), generator=g)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hype-flags", default="--hype-type normal --hype-eps 1e-5",
                        help="flags of the HyPe run (quoted)")
    opts = parser.parse_args()

    runs = {"vanilla": build_trainer("sentence_prediction", opts, []),
            "hype": build_trainer("hype_sentence_prediction", opts, opts.hype_flags.split())}
    data = batches(opts, opts.warmup + opts.steps)
    # wall time, and process CPU time (less sensitive to other jobs on a shared machine)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(clock, name): [] for clock in clocks for name in runs}
    for step, sample in enumerate(data):
        order = list(runs.items()) if step % 2 == 0 else list(reversed(runs.items()))
        for name, trainer in order:
            start = {clock: fn() for clock, fn in clocks.items()}
            trainer.train_step([sample])
            if step >= opts.warmup:
                for clock, fn in clocks.items():
                    times[clock, name].append(fn() - start[clock])
    print(f"config: roberta {opts.layers}L dim {opts.dim}, batch {opts.batch} x {opts.seq_len} tokens, "
          f"{opts.steps} timed steps each (interleaved), torch threads {torch.get_num_threads()}, "
          f"hype flags: {opts.hype_flags}")
    for clock in clocks:
        hype, vanilla = times[clock, "hype"], times[clock, "vanilla"]
        paired = statistics.median(h / v for h, v in zip(hype, vanilla))  # same batch, back to back
        print(f"{clock:4s}: vanilla median {statistics.median(vanilla) * 1e3:8.1f} ms, hype median "
              f"{statistics.median(hype) * 1e3:8.1f} ms; ratio hype/vanilla: of medians "
              f"{statistics.median(hype) / statistics.median(vanilla):.4f}, of minima {min(hype) / min(vanilla):.4f}, "
              f"median of paired ratios {paired:.4f}")


if __name__ == "__main__":
    main()
