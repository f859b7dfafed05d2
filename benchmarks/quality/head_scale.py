"""What does R4F's spectral-norm head do to the fresh head of the quality study's model, before training?

Spectral normalisation divides each head matrix by its largest singular value sigma (torch's spectral_norm
estimates sigma by power iteration, one step per train-mode forward). The R4F paper uses it to bound the
head's Lipschitz constant by 1; that bound constrains a matrix only where sigma > 1. For the converted
all-MiniLM-L6-v2 and a task's dev sentences (the quality study's binarized data) this measures, in eval mode
and fp32:
- per head matrix (`dense`, initialised from BERT's pooler; `out_proj`, fresh): sigma, the factor 1 / sigma the
  normalisation multiplies it by, and sigma as the first train-mode forward estimates it (one power iteration
  from the layer's fresh random u, as in a training run's first update);
- the head's output on dev sentences, plain and normalised (exact sigma): mean |logit|, the RMS of `dense`'s
  output before its tanh and the share of tanh outputs above 0.9 in size, and the spectral norm of the head's
  Jacobian d logits / d features (how strongly the head passes the loss gradient to the encoder), averaged
  over sentences;
- for comparison, the same sigmas for the fresh heads fairseq registers on the R4F paper's RoBERTa-large and on
  RoBERTa-base (no pooler: both matrices at nn.Linear's default init; `fresh_head_sigmas`, seeds 1-5), where
  the normalisation's factors differ from this model's.

    python benchmarks/quality/head_scale.py --work-dir /work/qwork/study --task CoLA \
        --out benchmarks/results/quality/head_scale

Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from robustft_common.spectral_norm_heads import HEAD_MATRICES  # noqa: E402

HEAD_NAME = "sentence_classification_head"


@functools.cache
def _noise_scale():  # its `load` builds the study's model exactly as a run starts; one copy of that code
    spec = importlib.util.spec_from_file_location("noise_scale", Path(__file__).with_name("noise_scale.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigma(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


def first_forward_sigma(linear: torch.nn.Linear, seed: int = 1) -> float:
    """sigma as torch's spectral_norm estimates it after one train-mode forward, from a fresh u drawn with
    `seed` (on a copy: the model is untouched)."""
    layer = copy.deepcopy(linear).float().train()
    torch.manual_seed(seed)  # spectral_norm draws u (and v) from the global generator when it is applied
    torch.nn.utils.spectral_norm(layer)
    with torch.no_grad():
        layer(torch.zeros(1, layer.in_features))  # one power iteration, as a training step's forward
    w, w_orig = layer.weight.detach(), layer.weight_orig.detach()
    return float(w_orig.norm() / w.norm())


# (label, input dim, inner dim, classes): the heads `fairseq-train --task sentence_prediction` registers on the
# R4F paper's model (roberta.large, 1024) and on roberta.base (768), binary GLUE tasks
FRESH_HEADS = (("RoBERTa-large", 1024, 1024, 2), ("RoBERTa-base", 768, 768, 2))


def fresh_head_sigmas(input_dim: int, inner_dim: int, num_classes: int, seeds=(1, 2, 3, 4, 5)) -> dict:
    """sigma of each matrix of fairseq's RobertaClassificationHead as `register_classification_head` builds it
    (after the model's init_bert_params, so at nn.Linear's default init), one head per seed: {matrix: [sigma]}."""
    from fairseq.models.roberta.model import RobertaClassificationHead

    sigmas: dict = {name: [] for name in HEAD_MATRICES}
    for seed in seeds:
        torch.manual_seed(seed)
        head = RobertaClassificationHead(input_dim, inner_dim, num_classes, "tanh", 0.0)
        for name in HEAD_MATRICES:
            sigmas[name].append(sigma(getattr(head, name).weight))
    return sigmas


def head_pass(head, features: torch.Tensor, scales: dict) -> dict:
    """The classification head on first-token features, each matrix multiplied by scales[name]; returns its
    logits, `dense`'s pre-activation, the activation's output and the per-sentence Jacobian d logits / d x."""
    dense_w = head.dense.weight.detach().float() * scales["dense"]
    out_w = head.out_proj.weight.detach().float() * scales["out_proj"]
    x = features.detach().float().clone().requires_grad_(True)
    z = x @ dense_w.T + head.dense.bias.detach().float()
    a = head.activation_fn(z)
    logits = a @ out_w.T + head.out_proj.bias.detach().float()
    rows = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)[0] for k in range(logits.size(1))]
    jac = torch.stack(rows, dim=1)  # (sentences, classes, features): sentence i's logits depend on its x only
    return {"logits": logits.detach(), "pre_activation": z.detach(), "activation": a.detach(), "jacobian": jac}


def measure(model, samples, scales: dict) -> dict:
    ns = _noise_scale()
    head = model.classification_heads[HEAD_NAME]
    logit_abs, z2, saturated, jac_norm, count, entries = 0.0, 0.0, 0, 0.0, 0, 0
    with torch.no_grad():
        feats = [ns.forward(model, sample)[0] for sample in samples]
    for h in feats:
        out = head_pass(head, h, scales)
        logit_abs += float(out["logits"].abs().sum())
        z2 += float(out["pre_activation"].pow(2).sum())
        saturated += int((out["activation"].abs() > 0.9).sum())
        entries += out["activation"].numel()
        jac_norm += float(torch.linalg.matrix_norm(out["jacobian"].double(), ord=2).sum())
        count += h.size(0)
    return {
        "mean_abs_logit": logit_abs / (count * model.classification_heads[HEAD_NAME].out_proj.out_features),
        "rms_pre_activation": (z2 / entries) ** 0.5,
        "share_saturated": saturated / entries,
        "mean_jacobian_norm": jac_norm / count,
    }


def main(argv=None) -> int:
    ns = _noise_scale()
    args = ns.parse_cli(__doc__, argv)
    model, samples = ns.study_model_and_samples(args)
    head = model.classification_heads[HEAD_NAME]
    matrices = []
    for name in HEAD_MATRICES:
        w = getattr(head, name).weight
        s = sigma(w)
        matrices.append(
            {
                "matrix": name,
                "shape": list(w.shape),
                "sigma": s,
                "factor": 1 / s,
                "first_forward_sigma": first_forward_sigma(getattr(head, name)),
            }
        )
    plain = measure(model, samples, {m["matrix"]: 1.0 for m in matrices})
    normalised = measure(model, samples, {m["matrix"]: m["factor"] for m in matrices})
    fresh = {label: fresh_head_sigmas(i, d, k) for label, i, d, k in FRESH_HEADS}
    result = {
        "command": ns.command_line("head_scale.py", argv),
        "task": args.task,
        "dev_sentences": sum(int(s["nsentences"]) for s in samples),
        "matrices": matrices,
        "heads": {"plain": plain, "normalised": normalised},
        "fresh_heads": fresh,
    }
    lines = [
        f"# R4F's spectral-norm head against the plain head: all-MiniLM-L6-v2, {args.task} dev "
        f"({result['dev_sentences']} sentences), eval mode, fp32, before training",
        "",
        f"Command: `{result['command']}`",
        "",
        "sigma = largest singular value; the normalisation multiplies the matrix by 1 / sigma (torch's "
        "spectral_norm converges to it by power iteration; 'first forward' is its estimate after one step from "
        "a fresh u, seed 1). `dense` is initialised from the converted model's pooler, `out_proj` fresh.",
        "",
        "| matrix | shape | sigma | factor 1 / sigma | sigma after the first forward |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m['matrix']} | {' x '.join(map(str, m['shape']))} | {m['sigma']:.4f} | {m['factor']:.3f} | "
        f"{m['first_forward_sigma']:.4f} |"
        for m in matrices
    ]
    lines += [
        "",
        "Head on dev sentences (features = the pretrained encoder's first-token output): mean |logit|; RMS of "
        "`dense`'s output before its tanh; share of tanh outputs with |value| > 0.9; spectral norm of "
        "d logits / d features per sentence, averaged (the gain from the head's output back to the encoder).",
        "",
        "| head | mean abs logit | RMS pre-activation | share saturated | mean Jacobian norm |",
        "|---|---|---|---|---|",
    ]
    for label, r in (("plain (vanilla)", plain), ("spectral-normalised (R4F)", normalised)):
        lines.append(
            f"| {label} | {r['mean_abs_logit']:.4g} | {r['rms_pre_activation']:.4g} | "
            f"{100 * r['share_saturated']:.1f} % | {r['mean_jacobian_norm']:.4g} |"
        )
    lines += [
        "",
        "For comparison, the fresh heads fairseq registers on RoBERTa (no pooler: `dense` and `out_proj` at "
        "nn.Linear's default init), 2 classes, seeds 1-5: sigma min-max and the factor 1 / sigma at the mean.",
        "",
        "| model | matrix | shape | sigma | factor 1 / sigma |",
        "|---|---|---|---|---|",
    ]
    for label, i, d, k in FRESH_HEADS:
        for name, shape in (("dense", (d, i)), ("out_proj", (k, d))):
            values = fresh[label][name]
            lines.append(
                f"| {label} | {name} | {shape[0]} x {shape[1]} | {min(values):.4f}-{max(values):.4f} | "
                f"{len(values) / sum(values):.3f} |"
            )
    ns.write_outputs(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
