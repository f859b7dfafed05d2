#!/usr/bin/env python
"""Distribution of parameter sensitivities of a fairseq checkpoint (PATS paper, Fig. 2).

Two sources:
  --source ema       the sensitivity EMA sbar that adamax_pats / adamax_sage keep in the optimizer state
                     of the checkpoint (the state at the end of training); no data needed.
  --source gradient  s = |theta * g| computed here, g = gradient of the checkpoint's criterion summed
                     over --num-batches batches of --split (any checkpoint, e.g. a pretrained model
                     with a fine-tuning task: pass --data and task overrides).

Writes OUT/sensitivity.json (per-tensor mean/quantiles and a pooled log10 histogram) and
OUT/sensitivity.png (histogram of log10 s per module type, pooled over layers).

  python scripts/pats_sensitivity.py CKPT --out DIR [--source ema|gradient] [--data BIN]
"""

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

import pats_src  # noqa: F401  (registers the optimizers; checkpoint safe globals)
from robustft_common import param_filters

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
MODULE_TYPE = re.compile(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.(weight|bias)$")


def load(checkpoint, data=None, overrides=None):
    from fairseq import checkpoint_utils

    arg_overrides = dict(overrides or {})
    if data:
        arg_overrides["data"] = data
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=arg_overrides)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return models[0], cfg, task, state


def ema_sensitivities(model, cfg, state):
    """Map the optimizer's per-index state back to names: the optimizer holds the trainable params
    in named_parameters order split into [selected, rest] groups by the checkpoint's own filter."""
    opt_cfg = cfg.optimizer
    name = opt_cfg._name
    if name not in ("adamax_pats", "adamax_sage"):
        raise SystemExit(f"--source ema needs an adamax_pats/adamax_sage checkpoint, this one used {name}")
    prefix = "pats" if name == "adamax_pats" else "sage"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mask = param_filters.select(
        names,
        opt_cfg[f"{prefix}_param_include"],
        opt_cfg[f"{prefix}_param_exclude"],
        f"--{prefix}-param-include",
        f"--{prefix}-param-exclude",
    )
    selected = [n for n, m in zip(names, mask) if m]
    opt_state = state["last_optimizer_state"]["state"]
    out = {}
    for index, n in enumerate(selected):
        s = opt_state.get(index, {}).get("sensitivity")
        if s is not None:
            out[n] = s.float()
    if not out:
        raise SystemExit("no sensitivity EMA in the optimizer state (PATS noise off? no update yet?)")
    return out


def gradient_sensitivities(model, cfg, task, split, num_batches, batch_size, include, exclude):
    task.load_dataset(split)
    criterion = task.build_criterion(cfg.criterion)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_sentences=batch_size,
        max_positions=model.max_positions(),
        ignore_invalid_inputs=True,
        seed=1,
    ).next_epoch_itr(shuffle=False)
    model.train(False)
    model.zero_grad()
    for i, sample in enumerate(itr):
        if i >= num_batches:
            break
        loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    mask = param_filters.select(names, include, exclude, "--include", "--exclude")
    params = dict(model.named_parameters())
    return {n: (params[n].detach() * params[n].grad).abs().float() for n, m in zip(names, mask) if m}


def summarize(sens):
    per_tensor = {}
    for n, s in sens.items():
        flat = s.reshape(-1)
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
        q = torch.quantile(sample.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        per_tensor[n] = {
            "numel": flat.numel(),
            "mean": flat.double().mean().item(),
            "max": flat.max().item(),
            "frac_zero": (flat == 0).double().mean().item(),
            "quantiles": dict(zip(map(str, QUANTILES), q)),
        }
    return per_tensor


def log_histograms(sens, bins):
    by_type = defaultdict(list)
    for n, s in sens.items():
        m = MODULE_TYPE.search(n)
        by_type[m.group(0) if m else "other"].append(s.reshape(-1))
    pooled = torch.cat([s.reshape(-1) for s in sens.values()])
    positive = pooled[pooled > 0]
    lo = math.floor(positive.log10().min().item()) if positive.numel() else -12
    hi = math.ceil(positive.log10().max().item()) if positive.numel() else 0
    edges = torch.linspace(lo, hi, bins + 1)
    hists = {}
    for key, parts in sorted(by_type.items()):
        vals = torch.cat(parts)
        vals = vals[vals > 0].log10()
        hists[key] = torch.histogram(vals, bins=edges).hist.tolist()
    return edges.tolist(), hists


def plot(edges, hists, path, title):
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, counts in hists.items():
        total = sum(counts) or 1
        ax.plot(centers, [c / total for c in counts], label=key)
    ax.set_xlabel("log10 sensitivity |theta * g|")
    ax.set_ylabel("fraction of parameters")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", choices=["ema", "gradient"], default="ema")
    ap.add_argument("--data", help="binarized data dir (overrides the checkpoint's task.data)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--num-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--include", default=param_filters.ENCODER_LAYERS, help="--source gradient: regex of parameters to analyse"
    )
    ap.add_argument("--exclude", default=param_filters.LAYER_NORM)
    ap.add_argument("--bins", type=int, default=60)
    args = ap.parse_args(argv)
    if args.num_batches < 1 or args.batch_size < 1:
        ap.error("--num-batches and --batch-size must be >= 1")

    model, cfg, task, state = load(args.checkpoint, args.data)
    if args.source == "ema":
        sens = ema_sensitivities(model, cfg, state)
    else:
        sens = gradient_sensitivities(
            model, cfg, task, args.split, args.num_batches, args.batch_size, args.include, args.exclude
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    edges, hists = log_histograms(sens, args.bins)
    report = {
        "checkpoint": str(args.checkpoint),
        "source": args.source,
        "num_updates": state.get("optimizer_history", [{}])[-1].get("num_updates"),
        "per_tensor": summarize(sens),
        "log10_bin_edges": edges,
        "histograms": hists,
    }
    (out / "sensitivity.json").write_text(json.dumps(report, indent=1))
    plot(edges, hists, out / "sensitivity.png", f"{Path(args.checkpoint).name} ({args.source})")
    print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'} ({len(sens)} tensors)")


if __name__ == "__main__":
    main()
