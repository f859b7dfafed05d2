#!/usr/bin/env python
"""Overhead of adamax_pats / adamax_sage over fairseq's adamax on a roberta-base model (~125M params).

Times `optimizer.step()` alone (same gradients for every optimizer), and with --train-step a full
forward + backward + step of sentence classification (batch x seq tokens), and prints the ratios.

  OMP_NUM_THREADS=2 python scripts/bench_pats_overhead.py [--device cuda] [--arch roberta_base]
      [--reps 5] [--train-step --batch 8 --seq 128]
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import torch

import pats_src  # noqa: F401
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models.roberta import RobertaModel
from fairseq.optim.adamax import Adamax as FairseqAdamax
from pats_src.sensitivity_adamax import SensitivityAdamax
from robustft_common import param_filters


def build_model(arch, device):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent", "--task", "sentence_prediction",
                                                "--num-classes", "2", "--arch", arch])
    dictionary = Dictionary()
    for i in range(50265 - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    model = RobertaModel.build_model(args, SimpleNamespace(source_dictionary=dictionary, max_positions=lambda: 512))
    model.register_classification_head("sentence_classification_head", num_classes=2)
    return model.to(device)


def make_optimizers(named, device):
    names = [n for n, _ in named]
    params = [p for _, p in named]
    sensitive = param_filters.select(names, param_filters.ENCODER_LAYERS, param_filters.LAYER_NORM,
                                     "--pats-param-include", "--pats-param-exclude")
    common = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    return {
        "adamax (fairseq)": FairseqAdamax(params, **common),
        "adamax_pats noise 0": SensitivityAdamax(params, sensitive=sensitive, pats_noise=0.0, **common),
        "adamax_pats": SensitivityAdamax(params, sensitive=sensitive, **common),
        "adamax_sage": SensitivityAdamax(params, sensitive=sensitive, mode="sage", **common),
    }, sum(sensitive), len(params)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, device):
    fn()  # warm-up (state allocation)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="roberta_base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-step", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers, n_sel, n_all = make_optimizers(named, device)
    n_params = sum(p.numel() for _, p in named)
    print(f"{args.arch} on {device}: {n_params / 1e6:.1f}M params, {n_all} tensors, "
          f"{n_sel} selected by the default PATS/SAGE filter; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    step_times = {name: timed(opt.step, args.reps, device) for name, opt in optimizers.items()}
    base = step_times["adamax (fairseq)"]
    for name, t in step_times.items():
        print(f"optimizer.step  {name:22s} {t * 1e3:9.1f} ms  x{t / base:.3f}")
    if args.train_step:
        tokens = torch.randint(4, 50265, (args.batch, args.seq), device=device)
        tokens[:, 0] = 0
        target = torch.randint(0, 2, (args.batch,), device=device)
        model.train()

        def fwd_bwd():
            for _, p in named:
                p.grad = None
            logits, _ = model(tokens, features_only=True, classification_head_name="sentence_classification_head")
            torch.nn.functional.cross_entropy(logits.float(), target).backward()

        fb = timed(fwd_bwd, args.reps, device)
        print(f"forward+backward ({args.batch}x{args.seq} tokens) {fb * 1e3:9.1f} ms")
        for name, t in step_times.items():
            print(f"train step      {name:22s} x{(fb + t) / (fb + base):.3f} of adamax "
                  f"(overhead {(t - base) / (fb + base) * 100:+.1f}% of a step)")


if __name__ == "__main__":
    main()
