"""How large is each method's noise next to what it perturbs, on the quality study's model and data?

For the converted all-MiniLM-L6-v2 and a task's dev sentences (the quality study's binarized data), this
measures, in eval mode (no dropout) and fp32:
- the RMS of what each method perturbs: every Transformer layer's input (HyPe), the token embeddings (R3F,
  NEFTune, SMART and FreeLB), every weight (NoisyTune, applied once before training);
- the RMS of the method's noise at the registry's recipe value, and their ratio; for SMART and FreeLB the
  adversarial delta their training pass sees after their ascent steps (`adversarial_delta`);
- the effect on the sentence representation the classifier reads (the last layer's output at the first
  token): RMS of its change over its RMS;
- the effect on the classifier: mean |logit change| over mean |logit| and the share of dev predictions that
  change, with the noise at the recipe value and at larger scales (the same hooks, eps x 10^k; NoisyTune
  at lambda x 10^-k, its recipe being a large perturbation already).

    python benchmarks/quality/noise_scale.py --work-dir /work/qwork/study --task CoLA \
        --out benchmarks/results/quality/noise_scale

Writes OUT.md and OUT.json. The model is the one the quality study trains from (not fine-tuned): the
question is whether the noise is large enough to change anything the fine-tuning sees.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from robustft_common import atomic_files, glue_tasks  # noqa: E402
from robustft_common.methods import get_method  # noqa: E402


def flag(method: str, name: str, default=None) -> str:
    """The registry's value of `name` for `method`; `default` (the config dataclass's) where the registry
    leaves the flag unset."""
    flags = get_method(method).flags
    if name not in flags and default is not None:
        return str(default)
    return flags[flags.index(name) + 1]


def load(work: Path, task: str):
    """The model exactly as a study run starts (its fairseq-train flags, the converted checkpoint's weights and
    the head initialised from the pooler), in eval mode."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.utils import import_user_module

    from robustft_experiments import quality

    data = work / "data" / "main" / glue_tasks.canonical_name(task)
    data = data.with_name(data.name + "-bin")
    if not data.exists():
        raise SystemExit(f"--work-dir: {data} is missing; run the quality study's main stage for {task} first")
    pretrained = quality.prepare_model(work)
    argv = quality.train_command(task, "vanilla", 1, 1e-5, data, work / "noise_scale", pretrained, 1000)
    argv = argv[argv.index(str(data)) :]
    parser = options.get_training_parser()
    import_user_module(argparse.Namespace(user_dir=str(REPO / "robustft")))
    args = options.parse_args_and_arch(parser, argv)
    task_obj = tasks.setup_task(args)
    model = task_obj.build_model(args)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(pretrained["model"]))
    model.load_state_dict(state["model"], strict=False)
    return model.eval(), task_obj, data


def batches(task_obj, n: int, batch: int = 32):
    task_obj.load_dataset("valid")
    ds = task_obj.dataset("valid")
    for start in range(0, min(n, len(ds)), batch):
        yield ds.collater([ds[i] for i in range(start, min(start + batch, n, len(ds)))])


def layers_of(model):
    return model.encoder.sentence_encoder.layers


def logits(model, sample) -> torch.Tensor:
    out, _ = model(**sample["net_input"], features_only=True, classification_head_name="sentence_classification_head")
    return out.float()


def forward(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(sentence representation, logits): the classification head's input at the first token, and its output."""
    feats: list = []
    head = model.classification_heads["sentence_classification_head"]
    hook = head.register_forward_pre_hook(lambda m, args: feats.append(args[0][:, 0, :].detach().float()))
    try:
        out = logits(model, sample)
    finally:
        hook.remove()
    return feats[0], out


def compare(clean_pass, noisy_pass, samples) -> dict:
    """Each pass maps a sample to (representation, logits)."""
    diffs, mags, flips, total, h_d2, h_2 = 0.0, 0.0, 0, 0, 0.0, 0.0
    with torch.no_grad():
        for sample in samples:
            h_clean, clean = clean_pass(sample)
            h_noisy, noisy = noisy_pass(sample)
            diffs += float((noisy - clean).abs().sum())
            mags += float(clean.abs().sum())
            flips += int((noisy.argmax(-1) != clean.argmax(-1)).sum())
            total += clean.size(0)
            h_d2 += float((h_noisy - h_clean).pow(2).sum())
            h_2 += float(h_clean.pow(2).sum())
    return {
        "representation_change": math.sqrt(h_d2 / h_2),
        "logit_change": diffs / mags,
        "predictions_changed": flips / total,
    }


def measure(model, samples, kind: str, scale: float, seed: int = 1):
    """(RMS of the perturbed tensors, RMS of the noise, their ratio, representation / logit change, share of
    changed argmax) for noise added in the forward pass."""
    gen = torch.Generator().manual_seed(seed)
    sums = {"x2": 0.0, "n2": 0.0, "count": 0, "on": False}

    def noise_like(x):
        if kind in ("hype_n",):
            return torch.randn(x.shape, generator=gen) * scale
        return (torch.rand(x.shape, generator=gen) * 2 - 1) * scale  # U(-scale, scale)

    def perturb(x):
        if not sums["on"]:
            return x
        n = noise_like(x)
        sums["x2"] += float(x.float().pow(2).sum())
        sums["n2"] += float(n.pow(2).sum())
        sums["count"] += x.numel()
        return x + n

    handles = []
    if kind.startswith("hype"):
        for layer in layers_of(model):
            handles.append(layer.register_forward_pre_hook(lambda m, args: (perturb(args[0]), *args[1:])))
    else:  # token embeddings (R3F's and NEFTune's hook point)
        emb = model.encoder.sentence_encoder.embed_tokens
        handles.append(emb.register_forward_hook(lambda m, args, out: perturb(out)))

    def noisy_pass(sample):
        sums["on"] = True
        try:
            return forward(model, sample)
        finally:
            sums["on"] = False

    effect = compare(lambda sample: forward(model, sample), noisy_pass, samples)
    for h in handles:
        h.remove()
    rms_x = math.sqrt(sums["x2"] / sums["count"])
    rms_n = math.sqrt(sums["n2"] / sums["count"])
    return {"rms_perturbed": rms_x, "rms_noise": rms_n, "noise_over_signal": rms_n / rms_x, **effect}


def measure_noisytune(model, samples, noise_lambda: float, seed: int = 1):
    """NoisyTune's one-off weight perturbation (the plugin's own kernel, `SensitivityAdamax.noisytune_`, on
    every tensor as the registry's recipe selects them) applied to a copy of the model."""
    import copy

    from pats_src.sensitivity_adamax import SensitivityAdamax

    noisy = copy.deepcopy(model)
    before = [p.detach().clone() for p in noisy.parameters()]
    with torch.no_grad():
        SensitivityAdamax(list(noisy.parameters()), seed=seed).noisytune_(noise_lambda)
    perturbed = [(p.detach(), b) for p, b in zip(noisy.parameters(), before) if b.numel() > 1]  # as noisytune_
    x2 = sum(float(b.pow(2).sum()) for _, b in perturbed)
    n2 = sum(float((p - b).pow(2).sum()) for p, b in perturbed)
    count = sum(b.numel() for _, b in perturbed)
    effect = compare(lambda sample: forward(model, sample), lambda sample: forward(noisy, sample), samples)
    rms_x, rms_n = math.sqrt(x2 / count), math.sqrt(n2 / count)
    return {"rms_perturbed": rms_x, "rms_noise": rms_n, "noise_over_signal": rms_n / rms_x, **effect}


def adversarial_delta(model, sample, method: str, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, keep): the token-embedding perturbation a training pass of `method` sees, from the plugin's own
    kernels at the registry's recipe values with every size (random start, step, bound) x `factor`. FreeLB:
    its last pass's delta, after `--freelb-steps` ascent steps on the task loss of the gold labels
    (baselines_src/freelb.py); SMART: delta after `--smart-steps` ascent steps on the symmetric KL to the
    clean prediction (baselines_src/smart.py). Eval mode: no dropout, so the ascent is deterministic given
    the random start (global RNG)."""
    from baselines_src import freelb, smart
    from rxf_src.embedding_noise import EncoderEmbeddingNoise, transformer_encoder

    src = sample["net_input"]["src_tokens"]
    encoder = transformer_encoder(model, method)
    keep = src.ne(encoder.padding_idx).unsqueeze(-1).float()
    dim = encoder.embed_tokens.embedding_dim
    with torch.no_grad():
        clean = logits(model, sample)
    if method == "freelb":
        steps = int(flag("freelb", "--freelb-steps"))
        lr, init, bound = (
            float(flag("freelb", f)) * factor for f in ("--freelb-adv-lr", "--freelb-init-mag", "--freelb-max-norm")
        )
        norm = flag("freelb", "--freelb-norm", freelb.SentencePredictionFreeLBConfig.freelb_norm)
        delta = freelb.initial_delta(keep, dim, init, norm)
        target = model.get_targets(sample, [clean]).view(-1)

        def loss_of(out):
            return torch.nn.functional.cross_entropy(out, target, reduction="sum")

        def step(d, g):
            return freelb.ascent_step(d, g, lr, bound, norm)
    else:
        steps = int(flag("smart", "--smart-steps"))
        eta, sigma, eps = (
            float(flag("smart", f)) * factor for f in ("--smart-step-size", "--smart-noise-std", "--smart-eps")
        )
        norm = flag("smart", "--smart-norm", smart.SentencePredictionSmartConfig.smart_norm)
        delta = torch.randn((*src.shape, dim)) * sigma * keep

        def loss_of(out):
            return smart.mtdnn_symmetric_kl(clean, out).sum()

        def step(d, g):
            return smart.ascent_step(d, g, eta, eps, norm) * keep

    for _ in range(steps):
        delta.requires_grad_()
        with EncoderEmbeddingNoise(model, src, method=method, delta=delta):
            out = logits(model, sample)
        (grad,) = torch.autograd.grad(loss_of(out), delta)
        delta = step(delta.detach(), grad)
    return delta.detach(), keep


def measure_adversarial(model, samples, method: str, factor: float = 1.0, seed: int = 1) -> dict:
    """`measure`'s figures for FreeLB's and SMART's adversarial delta (`adversarial_delta`): RMS over the
    non-pad token-embedding entries, where delta lives."""
    from rxf_src.embedding_noise import EncoderEmbeddingNoise

    torch.manual_seed(seed)
    sums = {"x2": 0.0, "n2": 0.0, "count": 0.0}
    emb = model.encoder.sentence_encoder.embed_tokens

    def adversarial_pass(sample):
        with torch.enable_grad():
            delta, keep = adversarial_delta(model, sample, method, factor)
        src = sample["net_input"]["src_tokens"]
        with torch.no_grad():
            sums["x2"] += float((emb(src).float() * keep).pow(2).sum())
        sums["n2"] += float(delta.pow(2).sum())
        sums["count"] += float(keep.sum()) * delta.size(-1)
        with EncoderEmbeddingNoise(model, src, method=method, delta=delta):
            return forward(model, sample)

    effect = compare(lambda sample: forward(model, sample), adversarial_pass, samples)
    rms_x = math.sqrt(sums["x2"] / sums["count"])
    rms_n = math.sqrt(sums["n2"] / sums["count"])
    return {"rms_perturbed": rms_x, "rms_noise": rms_n, "noise_over_signal": rms_n / rms_x, **effect}


# shared by the measurement scripts beside this one (head_scale.py): one CLI, one model, one output format
def parse_cli(doc: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True, help="the quality study's --work-dir")
    p.add_argument("--task", default="CoLA")
    p.add_argument("--n", type=int, default=256, help="dev sentences")
    p.add_argument("--out", type=Path, required=True, help="OUT.md / OUT.json")
    return p.parse_args(argv)


def study_model_and_samples(args):
    """(model, its first `--n` dev batches) as a study run starts, with the fresh head drawn from seed 0."""
    torch.manual_seed(0)
    model, task_obj, _ = load(args.work_dir.resolve(), args.task)
    return model, list(batches(task_obj, args.n))


def command_line(script: str, argv=None) -> str:
    return f"python benchmarks/quality/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_outputs(out: Path, result: dict, lines: list[str]) -> None:
    """OUT.json and OUT.md, each whole or not at all; the table is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_files.write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_cli(__doc__, argv)
    model, samples = study_model_and_samples(args)
    hype_eps = float(flag("hype_n", "--hype-eps"))
    r3f_eps = float(flag("r3f", "--eps"))
    tokens = sum(int(s["net_input"]["src_tokens"].size(1)) for s in samples) / len(samples)
    dim = model.encoder.sentence_encoder.embed_tokens.embedding_dim
    neftune_scale = float(flag("neftune", "--neftune-alpha")) / math.sqrt(tokens * dim)
    rows = []
    for method, kind, base in (
        ("hype_n", "hype_n", hype_eps),
        ("hype_u", "hype_u", hype_eps),
        ("r3f", "embed", r3f_eps),
        ("neftune", "embed", neftune_scale),
    ):
        for factor in (1, 10, 100, 1000, 10000):
            row = {"method": method, "scale": base * factor, "x_recipe": factor}
            row.update(measure(model, samples, kind, base * factor))
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the scale column of the adversaries: their bound (SMART: per token, linf; FreeLB: per sentence, l2)
    bounds = {"smart": float(flag("smart", "--smart-eps")), "freelb": float(flag("freelb", "--freelb-max-norm"))}
    for method, factors in (("smart", (1, 10, 100, 1000, 10000)), ("freelb", (1, 10, 100))):
        for factor in factors:
            row = {"method": method, "scale": bounds[method] * factor, "x_recipe": factor}
            row.update(measure_adversarial(model, samples, method, factor))
            rows.append(row)
            print(json.dumps(row), flush=True)
    noisytune_lambda = float(flag("noisytune", "--noisytune-lambda"))
    for factor in (0.01, 0.1, 1):
        row = {"method": "noisytune", "scale": noisytune_lambda * factor, "x_recipe": factor}
        row.update(measure_noisytune(model, samples, noisytune_lambda * factor))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": command_line("noise_scale.py", argv),
        "task": args.task,
        "dev_sentences": sum(int(s["nsentences"]) for s in samples),
        "mean_padded_length": tokens,
        "rows": rows,
    }
    lines = [
        f"# Noise scale against what it perturbs: all-MiniLM-L6-v2, {args.task} dev ({result['dev_sentences']} "
        "sentences), eval mode, fp32",
        "",
        f"Command: `{result['command']}`",
        "",
        "Noise at the registry's recipe value (x 1) and larger (NoisyTune: smaller). RMS over every perturbed "
        "entry (NoisyTune: every weight of two or more entries, its lambda scales each tensor's std); "
        "representation change = RMS of the change of the last layer's output at the first token (what the "
        "head reads) over its RMS; logit change = mean |logit(noisy) - logit(clean)| / mean |logit(clean)|; "
        "predictions changed = share of dev sentences whose argmax changes. The pretrained model with the "
        "study's fresh classification head (pooler-initialised), before fine-tuning. SMART and FreeLB: the "
        "adversarial delta their training pass sees after their ascent steps (SMART: on the symmetric KL to the "
        "clean prediction; FreeLB: on the loss of the gold labels), every size of the recipe (random start, "
        "step, bound) x the factor; noise scale = the bound (SMART: per token, linf; FreeLB: per sentence, l2); "
        "RMS over the non-pad token-embedding entries, where delta lives.",
        "",
        "| method | noise scale | x recipe | RMS perturbed | RMS noise | noise / signal | representation change | "
        "logit change | predictions changed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['scale']:.3g} | {r['x_recipe']} | {r['rms_perturbed']:.3g} | {r['rms_noise']:.3g} | "
            f"{r['noise_over_signal']:.2e} | {r['representation_change']:.2e} | {r['logit_change']:.2e} | "
            f"{100 * r['predictions_changed']:.1f} % |"
        )
    write_outputs(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
