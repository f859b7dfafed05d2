"""The method registry: every fine-tuning method of the project, defined once.

A `Method` is what a study needs to run it: the fairseq-train flags of the method (criterion, method
flags, optimizer with its betas / eps / weight decay; never the schedule: lr, batch, updates are the
caller's), the baseline it is compared with, the optimizer family (which lr grid applies), the registered
components it needs, and the paper's recipe values with their source. `scripts/sweep.py`, `scripts/demo.py`,
`scripts/fp16_check.py`, `benchmarks/run.py`, `scripts/recipes/glue.sh`, the tests and the README's method
table all read it; none keeps its own copy.

Within a family every method uses the family's optimizer settings, so a method and its baseline differ
only in the method (a paired comparison measures the method, not the optimizer):
- adam: the RoBERTa GLUE recipe (fairseq `examples/roberta/config/finetuning/*.yaml`: Adam (0.9, 0.98),
  eps 1e-6, weight decay 0.1), which the R3F recipe uses too (r3f.md §2.3);
- adamax: the mt-dnn Adamax that SAGE's code ships and PATS follows (cliang1453/SAGE
  `module/bert_optim.py` class `Adamax`: (0.9, 0.999), e 1e-6, no bias correction; `mt_dnn/model.py`
  parameter groups: weight decay 0.01 except bias / LayerNorm; pats.md §1.3, §1.5, §2).
Where a paper trained with other optimizer settings (HyPe: AdamW (0.9, 0.999), wd 0.01, clip 1.0), those
are in the method's `recipe`; the GPU recipes (`scripts/recipes/glue.sh`) apply them as the schedule.

Command line (used by glue.sh):
    python -m robustft_common.methods list | table | flags METHOD | show METHOD | bash METHOD
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from robustft_common.param_filters import NO_DECAY


@dataclass(frozen=True)
class Method:
    name: str  # "r3f"
    label: str  # "R3F" (table label)
    flags: tuple[str, ...]  # fairseq-train flags of the method, optimizer included, schedule excluded
    baseline: str | None  # the method it is compared with; None for the baselines themselves
    optimizer_family: str  # "adam" or "adamax": which lr grid a study uses
    needs: tuple[tuple[str, str], ...]  # registered components, e.g. (("criterion", "sentence_prediction_r3f"),)
    recipe: dict  # the paper's recipe values for this method ...
    source: str  # ... and where each comes from (paper table / official code file)
    description: str
    task: str = "sentence_prediction"  # the fairseq task the flags are for (SEQ2SEQ_METHODS: translation)


# ------------------------------------------------------------------------------------------------
# building blocks (each written once)

# the stock sentence_prediction loss through the plugin's DDP-safe base criterion (MCC/F1/Pearson from
# summable counts; fairseq's own criterion gathers lists, which do not sum across workers)
VANILLA_LOSS = ("--criterion", "hype_sentence_prediction", "--hype-type", "none")
ADAM = ("--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-06", "--weight-decay", "0.1")
# mt-dnn / SAGE Adamax (module/bert_optim.py `Adamax`): no bias correction, e 1e-6, wd 0.01
MTDNN_ADAMAX = (
    "--adamax-betas",
    "(0.9,0.999)",
    "--adamax-eps",
    "1e-06",
    "--weight-decay",
    "0.01",
    "--no-bias-correction",
)
# mt-dnn / SAGE parameter groups: no weight decay on bias and LayerNorm (our optimizers only)
NO_DECAY_GROUPS = ("--weight-decay-exclude", NO_DECAY)
R3F = ("--criterion", "sentence_prediction_r3f", "--r3f-lambda", "0.7", "--eps", "1e-05", "--noise-type", "uniform")
R4F_HEAD = ("--spectral-norm-classification-head", "--r4f-spectral-norm-dense")
HYPE_N = ("--hype-type", "normal", "--hype-eps", "1e-05", "--dropout", "0.0")
HYPE_U = ("--hype-type", "uniform", "--hype-uniform", "symmetric", "--hype-eps", "1e-05", "--dropout", "0.0")
HYPE_U_OFFICIAL = ("--hype-type", "uniform", "--hype-uniform", "one_sided", "--hype-eps", "1e-05", "--dropout", "0.0")
HYPE_CRITERION = ("--criterion", "hype_sentence_prediction")

NEEDS_VANILLA = (("criterion", "hype_sentence_prediction"),)
NEEDS_R3F = (("criterion", "sentence_prediction_r3f"),)
# issue 18 baselines (baselines_src/, robustft_common/mixout.py)
RDROP = ("--criterion", "sentence_prediction_rdrop", "--rdrop-alpha", "1.0")
NEFTUNE = ("--criterion", "sentence_prediction_neftune", "--neftune-alpha", "5.0")
# Mixout replaces dropout (bloodwass/mixout example_huggingface.py L44-57: every dropout 0, every linear p 0.9)
MIXOUT = ("--mixout-p", "0.9", "--dropout", "0.0", "--attention-dropout", "0.0")
NEEDS_RDROP = (("criterion", "sentence_prediction_rdrop"),)
NEEDS_NEFTUNE = (("criterion", "sentence_prediction_neftune"),)
# ChildTuning: the family's Adam with the gradient mask (`adam_childtuning` takes every `adam` flag); p = 0.3 as
# AliceMind ChildTuning/run.sh (RTE); the author's per-task p in the recipe's source
ADAM_CHILDTUNING = ("--optimizer", "adam_childtuning") + ADAM[2:]
CHILDTUNING_F = ("--childtuning-mode", "F", "--childtuning-reserve-p", "0.3")
CHILDTUNING_D = ("--childtuning-mode", "D", "--childtuning-reserve-p", "0.3")
SMART = (
    "--criterion",
    "sentence_prediction_smart",
    "--smart-lambda",
    "1.0",
    "--smart-steps",
    "1",
    "--smart-step-size",
    "0.001",
    "--smart-noise-std",
    "1e-05",
    "--smart-eps",
    "1e-05",
    "--smart-mu",
    "1.0",
)
# FreeLB's task with any sentence-prediction loss (here the vanilla one); zhuchen03/FreeLB fairseq RTE script
FREELB = (
    "--task",
    "sentence_prediction_freelb",
    "--freelb-steps",
    "3",
    "--freelb-adv-lr",
    "0.06",
    "--freelb-init-mag",
    "0.16",
    "--freelb-max-norm",
    "0.14",
)
NEEDS_CHILDTUNING = NEEDS_VANILLA + (("optimizer", "adam_childtuning"),)
_SRC_CHILDTUNING = (
    "alibaba/AliceMind@a6d5afe ChildTuning: ChildTuningOptimizer.py L55-64 (F: grad * Bernoulli(p) / p; D: grad * "
    "mask), ChildTuningD.py L50-106 (Fisher pass, global percentile), run.sh (RTE: reserve_p 0.3, lr 4e-5, batch "
    "16, 3 epochs, wd 0.01, no warmup) (baselines.md §2); per-task p (author, AliceMind #28): CoLA 0.2/0.2, RTE "
    "0.3/0.3, MRPC F 0.4 / D 0.1, STS-B 0.2/0.2"
)

# recipe values shared by several methods, with their sources
ROBERTA_GLUE = {
    "optimizer": "adam",
    "adam_betas": "(0.9, 0.98)",
    "adam_eps": 1e-6,
    "weight_decay": 0.1,
    "clip_norm": 0.0,
    "lr_scheduler": "polynomial_decay, 6% warmup",
    "max_epoch": 10,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "lr": "per task 1e-5 / 2e-5",
    "batch_size": "16 / 32 per task",
    "fp16": True,
    "checkpoint": "best dev",
    "schedule": "roberta_glue",
}
SRC_ROBERTA = "RoBERTa GLUE recipe: fairseq examples/roberta/config/finetuning/<task>.yaml (r3f.md §2.3)"
HYPE_README = {
    "optimizer": "adam (AdamW)",
    "adam_betas": "(0.9, 0.999)",
    "adam_eps": 1e-6,
    "weight_decay": "0.01 except bias/LayerNorm",
    "clip_norm": 1.0,
    "lr": 2e-5,
    "batch_size": 16,
    "max_epoch": 3,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear decay",
    "dropout": 0.0,
    "attention_dropout": 0.1,
    "fp16": False,
    "checkpoint": "last",
    "schedule": "hype_readme",
}
SRC_HYPE_README = (
    "Yuanhy1997/HyPe@196efd5 README RTE command: --dropout_rate 0.0, lr 2e-5, batch 16, 3 epochs, "
    "warmup 0.1, wd 0.01, adam eps 1e-6; optimizer via transformers 4.7.0 Trainer (hype.md §2)"
)
MTDNN_RECIPE = {
    "optimizer": "adamax",
    "adamax_betas": "(0.9, 0.999)",
    "adamax_eps": 1e-6,
    "bias_correction": False,
    "weight_decay": "0.01 except bias/LayerNorm",
    "clip_norm": 1.0,
    "lr": "per task, grid 1e-5 ... 5e-4",
    "batch_size": 32,
    "max_epoch": 10,
    "warmup_ratio": 0.1,
    "schedule": "pats_adamax",
}
SRC_MTDNN = (
    "PATS paper §4 recipe (Adamax, batch 32, 10 epochs, warmup 0.1, lr grid; pats.md §1.5); Adamax as "
    "cliang1453/SAGE@87cefb1 module/bert_optim.py `Adamax` (no bias correction, e 1e-6) with "
    "mt_dnn/model.py parameter groups (wd 0.01 except bias/LayerNorm) (pats.md §1.3, §2)"
)


def _hype_recipe(noise: str, uniform: str | None = None) -> dict:
    out = {"hype_type": noise, "hype_eps": 1e-5}
    if uniform:
        out["hype_uniform"] = uniform
    return {**out, **HYPE_README}


_R3F_RECIPE = {"r3f_lambda": 0.7, "eps": 1e-5, "noise_type": "uniform"}
_SRC_R3F = (
    "fairseq examples/rxf/README.md L13-41, RTE recipe: lambda 0.7, uniform, eps 1e-5 (r3f.md §2.3); "
    "lambda 1.0 is only the criterion's code default (sentence_prediction_r3f.py L47)"
)
_PATS_RECIPE = {"pats_noise": 1e-6, "pats_beta": 0.75, "pats_margin": 5e-3, "pats_eps": 1e-12, "pats_prob": 0.5}

# ------------------------------------------------------------------------------------------------
# the methods, in report order: each baseline first, then the methods compared with it

_METHOD_LIST = (
    Method(
        "vanilla",
        "Vanilla",
        VANILLA_LOSS + ADAM,
        None,
        "adam",
        NEEDS_VANILLA,
        dict(ROBERTA_GLUE),
        SRC_ROBERTA,
        "Plain fine-tuning: the stock sentence_prediction loss (through hype_sentence_prediction "
        "--hype-type none, whose metrics are DDP-safe) with the RoBERTa GLUE Adam.",
    ),
    Method(
        "r3f",
        "R3F",
        R3F + ADAM,
        "vanilla",
        "adam",
        NEEDS_R3F,
        {**_R3F_RECIPE, **ROBERTA_GLUE},
        f"{_SRC_R3F}; schedule: {SRC_ROBERTA}",
        "R3F (Aghajanyan et al., ICLR 2021): a second pass on uniformly noised token embeddings; loss + "
        "lambda * symmetric KL of the two class distributions.",
    ),
    Method(
        "r4f",
        "R4F",
        R3F + R4F_HEAD + ADAM,
        "vanilla",
        "adam",
        NEEDS_R3F,
        {**_R3F_RECIPE, "spectral_norm": "out_proj and dense", **ROBERTA_GLUE},
        f"paper §2 eq. 5: Lip(g) <= 1, spectral norm on all of the head's weights (fairseq's flag covers "
        f"out_proj only, r3f.md §3.3); {_SRC_R3F}",
        "R4F: R3F with a spectrally normalised classification head (dense and out_proj).",
    ),
    Method(
        "hype_n",
        "HyPe-N",
        HYPE_CRITERION + HYPE_N + ADAM,
        "vanilla",
        "adam",
        NEEDS_VANILLA,
        _hype_recipe("normal"),
        "HyPe paper Table 1 HyPe-N, eps 1e-5 (main.py L202-220 default; hype.md §1.4, §5); dropout 0: "
        f"{SRC_HYPE_README}",
        "HyPe-N (Yuan et al., ACL 2023): N(0, eps^2) noise on every Transformer layer's input while "
        "training, dropout off (the paper's main variant).",
    ),
    Method(
        "hype_u",
        "HyPe-U",
        HYPE_CRITERION + HYPE_U + ADAM,
        "vanilla",
        "adam",
        NEEDS_VANILLA,
        _hype_recipe("uniform", "symmetric"),
        f"HyPe paper: HyPe-U draws U(-eps, eps) (hype.md §1.2, §4.1); eps 1e-5 and dropout 0: {SRC_HYPE_README}",
        "HyPe-U as the paper defines it: symmetric uniform U(-eps, eps) layer-input noise, dropout off.",
    ),
    Method(
        "hype_u_official",
        "HyPe-U (official code)",
        HYPE_CRITERION + HYPE_U_OFFICIAL + ADAM,
        "vanilla",
        "adam",
        NEEDS_VANILLA,
        _hype_recipe("uniform", "one_sided"),
        "Yuanhy1997/HyPe README RTE command --hype_type uniform --hype_eps 1e-5 --dropout_rate 0.0; "
        "hype_modeling_roberta.py L530-541 draws .uniform_() = U[0, eps) (hype.md §1.2, §2)",
        "HyPe-U as the official code runs it: one-sided U[0, eps) (mean eps/2, half the paper's spread).",
    ),
    Method(
        "hype_r3f",
        "HyPe+R3F",
        R3F + HYPE_N + ADAM,
        "vanilla",
        "adam",
        NEEDS_R3F,
        {**_R3F_RECIPE, **_hype_recipe("normal")},
        f"HyPe paper: HyPe-N on top of R3F, in HyPe's setting (hype.md §5, §3 last item); R3F: {_SRC_R3F}; "
        f"schedule: {SRC_HYPE_README}",
        "R3F's criterion with HyPe-N layer-input noise in both passes, dropout off.",
    ),
    Method(
        "rdrop",
        "R-Drop",
        RDROP + ADAM,
        "vanilla",
        "adam",
        NEEDS_RDROP,
        {"rdrop_alpha": 1.0, **ROBERTA_GLUE},
        "dropreg/R-Drop@9dcc830 fairseq_src/examples/roberta: roberta_rdrop_src/loss/reg_cross_entropy.py "
        "L92-131 (CE on both passes + alpha/2 * symmetric KL, --reg-alpha default 1.0), run.sh (dropout 0.1, "
        f"Adam (0.9, 0.98), eps 1e-6) (baselines.md §1); per-task alpha not recovered; schedule: {SRC_ROBERTA}",
        "R-Drop (Liang et al., NeurIPS 2021): two passes with independent dropout, the task loss on both + "
        "alpha/2 * symmetric KL of the two class distributions.",
    ),
    Method(
        "neftune",
        "NEFTune",
        NEFTUNE + ADAM,
        "vanilla",
        "adam",
        NEEDS_NEFTUNE,
        {"neftune_alpha": 5.0, "neftune_length": "padded", **ROBERTA_GLUE},
        "neelsjain/NEFTune@09d4909 README L25-34 (alpha 5, L = padded length), experiment_code/README.md "
        f"L41-48 (--neftune_alpha 5) (baselines.md §6); NEFTune has no GLUE recipe; schedule: {SRC_ROBERTA}",
        "NEFTune (Jain et al., 2023): U(-1, 1) * alpha / sqrt(L * d) noise on the token embeddings while "
        "training, through R3F's embedding-noise mechanism.",
    ),
    Method(
        "mixout",
        "Mixout",
        VANILLA_LOSS + MIXOUT + ADAM,
        "vanilla",
        "adam",
        NEEDS_VANILLA,
        {**ROBERTA_GLUE, "mixout_p": 0.9, "dropout": 0.0, "attention_dropout": 0.0},
        "bloodwass/mixout@18f377d mixout/mixout.py L34-79 (per-input-column Bernoulli mask, E[W~] = W) and "
        "example_huggingface.py L44-57 (p 0.9 on every linear, every dropout 0) (baselines.md §5); the paper's "
        f"per-task p not recovered; schedule: {SRC_ROBERTA}",
        "Mixout (Lee et al., ICLR 2020): while training, each Transformer linear layer's input columns revert to "
        "the pretrained weights with probability p (rescaled: E[W~] = W), dropout off. Needs a pretrained start.",
    ),
    Method(
        "childtuning_f",
        "ChildTuning-F",
        VANILLA_LOSS + ADAM_CHILDTUNING + CHILDTUNING_F,
        "vanilla",
        "adam",
        NEEDS_CHILDTUNING,
        {"childtuning_mode": "F", "childtuning_reserve_p": 0.3, **ROBERTA_GLUE},
        f"{_SRC_CHILDTUNING}; schedule: {SRC_ROBERTA}",
        "ChildTuning-F (Xu et al., EMNLP 2021): every update, each gradient entry is kept with probability p and "
        "scaled by 1/p (a fresh Bernoulli mask), right before Adam.",
    ),
    Method(
        "childtuning_d",
        "ChildTuning-D",
        VANILLA_LOSS + ADAM_CHILDTUNING + CHILDTUNING_D,
        "vanilla",
        "adam",
        NEEDS_CHILDTUNING,
        {"childtuning_mode": "D", "childtuning_reserve_p": 0.3, **ROBERTA_GLUE},
        f"{_SRC_CHILDTUNING}; schedule: {SRC_ROBERTA}",
        "ChildTuning-D: only the top-p share of the encoder layers' entries by Fisher information (one pass over "
        "the training data before the first update) is trained; the rest of the layers stays at its start.",
    ),
    Method(
        "smart",
        "SMART",
        SMART + ADAM,
        "vanilla",
        "adam",
        (("criterion", "sentence_prediction_smart"),),
        {
            "smart_lambda": 1.0,
            "smart_steps": 1,
            "smart_step_size": 1e-3,
            "smart_noise_std": 1e-5,
            "smart_eps": 1e-5,
            "smart_mu": 1.0,
            "smart_beta": "0.99 for the first 10% of updates, then 0.999",
            **ROBERTA_GLUE,
        },
        "SMART paper Alg. 1 values as transcribed in baselines.md §3.1 (lambda_s grid {1, 3, 5}, eta 1e-3, sigma "
        "1e-5, eps 1e-5, mu 1, beta 0.99 then 0.999, T 1; not checked against the paper's text); namisan/mt-dnn "
        "train.py (--adv_alpha 1, --adv_k 1, --adv_noise_var 1e-5, --adv_p_norm inf; its --adv_step_size 1e-5 is "
        "passed over the SmartPerturbation default 1e-3), mt_dnn/loss.py SymKlCriterion (baselines.md §3.2); "
        f"schedule: {SRC_ROBERTA}",
        "SMART (Jiang et al., ACL 2020): + lambda * symmetric KL between the class distributions at the token "
        "embeddings and at an adversarial perturbation (one projected ascent step), + mu * the same divergence to a "
        "momentum teacher (Bregman proximal point).",
    ),
    Method(
        "freelb",
        "FreeLB",
        FREELB + VANILLA_LOSS + ADAM,
        "vanilla",
        "adam",
        (("task", "sentence_prediction_freelb"),) + NEEDS_VANILLA,
        {"freelb_steps": 3, "freelb_adv_lr": 0.06, "freelb_init_mag": 0.16, "freelb_max_norm": 0.14, **ROBERTA_GLUE},
        "zhuchen03/FreeLB@eb23701 fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py L78-184 (K + 1 passes, "
        "per-sentence l2 step and bound) and launch/FreeLB RTE script (adv-lr 6e-2, adv-steps 3, rand-init-mag "
        "1.6e-1, max-norm 1.4e-1; RoBERTa-large, lr 1e-5, batch 16, Adam (0.9, 0.999) eps 1e-6, wd 0.1, no clip) "
        f"(baselines.md §4); schedule: {SRC_ROBERTA}",
        "FreeLB (Zhu et al., ICLR 2020): K ascent steps on a norm-bounded perturbation of the token embeddings, "
        "with the parameter gradients of all K + 1 passes accumulated into one update.",
    ),
    Method(
        "vanilla_adamax",
        "Vanilla (Adamax)",
        VANILLA_LOSS + ("--optimizer", "adamax") + MTDNN_ADAMAX,
        None,
        "adamax",
        NEEDS_VANILLA,
        {**MTDNN_RECIPE, "weight_decay": "0.01 on every tensor (fairseq adamax)"},
        SRC_MTDNN,
        "Plain fine-tuning with fairseq's adamax, the PATS paper's 'Fine-tune' baseline; mt-dnn's Adamax "
        "settings except that fairseq's adamax decays every tensor (it has no parameter groups).",
    ),
    Method(
        "noisytune",
        "NoisyTune",
        VANILLA_LOSS
        + ("--optimizer", "adamax_pats")
        + MTDNN_ADAMAX
        + NO_DECAY_GROUPS
        + ("--pats-noise", "0", "--noisytune-lambda", "0.15"),
        "vanilla_adamax",
        "adamax",
        NEEDS_VANILLA + (("optimizer", "adamax_pats"),),
        {"noisytune_lambda": 0.15, **MTDNN_RECIPE},
        f"NoisyTune (Wu et al., ACL 2022) reference snippet, lambda 0.15 (pats.md §3); {SRC_MTDNN}",
        "NoisyTune: once before fine-tuning W += U(-l/2, l/2) * std(W) on every tensor, then plain Adamax. "
        "Needs a pretrained start (--restore-file or --finetune-from-model).",
    ),
    Method(
        "sage",
        "SAGE",
        VANILLA_LOSS + ("--optimizer", "adamax_sage") + MTDNN_ADAMAX + NO_DECAY_GROUPS + ("--sage-beta3", "0.75"),
        "vanilla_adamax",
        "adamax",
        NEEDS_VANILLA + (("optimizer", "adamax_sage"),),
        {"sage_beta3": 0.75, "sage_eps": 1e-12, **MTDNN_RECIPE, "lr": "2-5x plain Adamax (SAGE README)"},
        "cliang1453/SAGE@87cefb1 module/bert_optim.py `UnstructAwareAdamax` (no first-moment bias "
        "correction, beta3 0.75, e^2 1e-12) and mt_dnn/model.py parameter groups (wd 0.01 except "
        "bias/LayerNorm) (pats.md §2)",
        "SAGE (Liang et al., ICLR 2022): Adamax whose per-entry step is scaled by |I - Ibar| / Ibar, "
        "I = |theta * g| (sensitivity), on the encoder layers.",
    ),
    Method(
        "pats",
        "PATS",
        VANILLA_LOSS
        + ("--optimizer", "adamax_pats")
        + MTDNN_ADAMAX
        + NO_DECAY_GROUPS
        + ("--pats-noise", "1e-06", "--pats-beta", "0.75", "--pats-margin", "0.005"),
        "vanilla_adamax",
        "adamax",
        NEEDS_VANILLA + (("optimizer", "adamax_pats"),),
        {**_PATS_RECIPE, **MTDNN_RECIPE},
        "PATS paper Alg. 1, Table 3 grids: sigma 1e-6 (middle of the grid), beta 0.75 (SAGE's default); "
        f"margin, eps, prob reconstructed (pats.md §1.2-§1.5); {SRC_MTDNN}",
        "PATS (Zhang et al., EMNLP 2022): Adamax plus Gaussian noise on the encoder layers, std "
        "sigma * mean sensitivity / entry sensitivity (larger for less sensitive entries).",
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}

# ------------------------------------------------------------------------------------------------
# encoder-decoder (BART) summarisation methods (issue 16): a table of their own, because every consumer of
# METHODS above trains sentence prediction; get_method / method_flags read both tables.

# BART's summarisation recipe optimizer (fairseq examples/bart/README.summarization.md L48-80)
BART_ADAM = ("--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-08", "--weight-decay", "0.01")
LABEL_SMOOTHED = ("--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
# rxf_src LS criterion's reference values (r3f.md §2.3: eps 1e-5 L44, lambda 1.0 L46, normal L48) and the
# reference's KL scale (per sentence, r3f.md §2.2); the paper gives no other values for Table 4
R3F_SEQ2SEQ = (
    "--criterion",
    "label_smoothed_cross_entropy_r3f",
    "--label-smoothing",
    "0.1",
    "--r3f-lambda",
    "1.0",
    "--eps",
    "1e-05",
    "--noise-type",
    "normal",
    "--r3f-kl-norm",
    "sentence",
)
BART_SUMMARIZATION = {
    "optimizer": "adam",
    "adam_betas": "(0.9, 0.999)",
    "adam_eps": 1e-8,
    "weight_decay": 0.01,
    "clip_norm": 0.1,
    "lr": 3e-5,
    "warmup_updates": 500,
    "max_tokens": 2048,
    "label_smoothing": 0.1,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "fp16": True,
    "schedule": "bart_summarization",
}
SRC_BART_SUMMARIZATION = (
    "BART summarisation recipe: fairseq examples/bart/README.summarization.md L48-80 (CNN/DM 20k updates, "
    "update-freq 4; XSum 15k, update-freq 2; lr 3e-5, 500 warmup, max-tokens 2048; datasets.md §9c)"
)

SEQ2SEQ_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "vanilla_seq2seq",
            "BART",
            LABEL_SMOOTHED + BART_ADAM,
            None,
            "bart_adam",
            (("criterion", "label_smoothed_cross_entropy"),),
            dict(BART_SUMMARIZATION),
            SRC_BART_SUMMARIZATION,
            "Plain BART fine-tuning: fairseq's label_smoothed_cross_entropy (0.1) with BART's summarisation Adam.",
            task="translation",
        ),
        Method(
            "r3f_seq2seq",
            "BART+R3F",
            R3F_SEQ2SEQ + BART_ADAM,
            "vanilla_seq2seq",
            "bart_adam",
            (("criterion", "label_smoothed_cross_entropy_r3f"),),
            {"r3f_lambda": 1.0, "eps": 1e-5, "noise_type": "normal", "r3f_kl_norm": "sentence", **BART_SUMMARIZATION},
            "rxf_src label_smoothed_cross_entropy_r3f.py defaults: eps 1e-5, lambda 1.0, normal (r3f.md §2.3), "
            f"KL per sentence as the reference (r3f.md §2.2); R3F paper Table 4; schedule: {SRC_BART_SUMMARIZATION}",
            "R3F on the label-smoothed loss (Aghajanyan et al. Table 4): a second pass with N(0, eps^2) noise on "
            "the encoder's token embeddings, + lambda * symmetric KL of the decoder's vocabulary distributions.",
            task="translation",
        ),
    )
}
# names the sweep, demo, fp16 check and benchmarks used before the registry
_FORMER_NAMES = {
    "hype": "hype_n, hype_u or hype_u_official",
    "adamax_pats": "pats",
    "adamax_sage": "sage",
    "adamax": "vanilla_adamax",
}


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError naming the known methods."""
    method = METHODS.get(name) or SEQ2SEQ_METHODS.get(name)
    if method is None:
        hint = f" ({name!r} is now {_FORMER_NAMES[name]})" if name in _FORMER_NAMES else ""
        raise ValueError(f"unknown method {name!r}{hint}; known: {', '.join([*METHODS, *SEQ2SEQ_METHODS])}")
    return method


def method_flags(name: str, overrides: Mapping[str, str | None] | None = None) -> list[str]:
    """The method's fairseq-train flags as a new list.

    `overrides` {flag: value} replaces the value of a flag the method has (value None removes the flag
    and its value), e.g. a test's larger noise: {"--eps": "1e-2", "--dropout": None}. Overriding a flag
    the method does not have is an error (it would silently do nothing).
    """
    flags = list(get_method(name).flags)
    for flag, value in (overrides or {}).items():
        if flag not in flags:
            raise ValueError(f"method {name!r} has no flag {flag}; its flags: {shlex.join(flags)}")
        i = flags.index(flag)
        has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        end = i + 2 if has_value else i + 1
        if value is None:
            del flags[i:end]
        elif has_value:
            flags[i + 1] = str(value)
        else:
            raise ValueError(f"method {name!r}: {flag} is a switch, it takes no value (use None to drop it)")
    return flags


def flag_value(flags: Sequence[str], flag: str) -> str | None:
    """The value `flag` has in `flags` (the last one, as argparse), or None when absent."""
    value = None
    for i, token in enumerate(flags[:-1]):
        if token == flag:
            value = flags[i + 1]
    return value


def _cell(text: str, code: bool = False) -> str:
    """Text for a markdown table cell: `|` escaped; outside code spans `<` too (not an HTML tag)."""
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text.replace("<", "&lt;")


def _without(flags: Sequence[str], block: Sequence[str]) -> list[str]:
    """`flags` less the first contiguous occurrence of `block` (the family's shared optimizer flags)."""
    flags, n = list(flags), len(block)
    for i in range(len(flags) - n + 1):
        if flags[i : i + n] == list(block):
            return flags[:i] + flags[i + n :]
    return flags


# ------------------------------------------------------------------------------------------------
# methods stacked in one run (issue 18): the pairs the plugin trains, with their flags, and the pairs it
# refuses at startup with an error naming a flag. Tests train every allowed pair end to end and check every
# refusal; baselines_src/README.md gives the reasons at length.


@dataclass(frozen=True)
class Combination:
    methods: tuple[str, str]  # registry methods: the first's criterion, with the second's flags on top
    flags: tuple[str, ...]  # the stacked run's flags (for a refused pair: the command that is refused)
    refused_by: str | None  # refused pairs: the flag the startup error names; None = allowed
    why: str

    @property
    def name(self) -> str:
        return "+".join(self.methods)


def _optimizer_of(method: str) -> tuple[str, ...]:
    """A vanilla-criterion method's optimizer flags (PATS, SAGE, NoisyTune): its flags less the loss."""
    return tuple(_without(get_method(method).flags, VANILLA_LOSS))


_HYPE_NOISE = tuple(_without(HYPE_N, ("--dropout", "0.0")))  # HyPe-N's noise; dropout left to the base method
_NEFTUNE_ON = NEFTUNE[2:]  # --neftune-alpha 5.0 on another criterion


def _combinations() -> tuple[Combination, ...]:
    mixout_base = VANILLA_LOSS + MIXOUT
    two_passes = "two-pass consistency criterions; a run has one --criterion (the HyPe paper reports each alone)"
    same_noise = "both noise the encoder's token embeddings (NEFTune = R3F's noisy pass without clean pass and KL)"
    sensitivity = "Mixout's reverted columns get a zero gradient, which PATS/SAGE/NoisyTune read as sensitivity"
    return (
        Combination(("rdrop", "hype_n"), RDROP + _HYPE_NOISE + ADAM, None, "HyPe paper: HyPe on top of R-Drop"),
        Combination(("rdrop", "r3f"), RDROP + R3F[2:] + ADAM, "--r3f-lambda", two_passes),
        Combination(("rdrop", "pats"), RDROP + _optimizer_of("pats"), None, "loss and optimizer are independent"),
        Combination(("rdrop", "sage"), RDROP + _optimizer_of("sage"), None, "loss and optimizer are independent"),
        Combination(("rdrop", "mixout"), RDROP + MIXOUT + ADAM, None, "each pass draws its own Mixout mask"),
        Combination(("rdrop", "neftune"), RDROP + _NEFTUNE_ON + ADAM, None, "each pass draws its own NEFTune noise"),
        Combination(("neftune", "hype_n"), NEFTUNE + _HYPE_NOISE + ADAM, None, "embedding vs hidden-state noise"),
        Combination(("neftune", "r3f"), R3F + _NEFTUNE_ON + ADAM, "--neftune-alpha", same_noise),
        Combination(("neftune", "pats"), NEFTUNE + _optimizer_of("pats"), None, "noise and optimizer independent"),
        Combination(("neftune", "sage"), NEFTUNE + _optimizer_of("sage"), None, "noise and optimizer independent"),
        Combination(("neftune", "mixout"), NEFTUNE + MIXOUT + ADAM, None, "input noise and weight mixing"),
        Combination(("mixout", "hype_n"), HYPE_CRITERION + _HYPE_NOISE + MIXOUT + ADAM, None, "both replace dropout"),
        Combination(("mixout", "r3f"), R3F + MIXOUT + ADAM, None, "each R3F pass draws its own Mixout mask"),
        Combination(("mixout", "pats"), mixout_base + _optimizer_of("pats"), "--mixout-p", sensitivity),
        Combination(("mixout", "sage"), mixout_base + _optimizer_of("sage"), "--mixout-p", sensitivity),
        Combination(("mixout", "noisytune"), mixout_base + _optimizer_of("noisytune"), "--mixout-p", sensitivity),
        *_part_b_combinations(),
    )


def _part_b_combinations() -> tuple[Combination, ...]:
    """ChildTuning (an optimizer), SMART (a criterion) and FreeLB (a task) with the other methods."""
    sage_childtuning = tuple("adamax_sage_childtuning" if a == "adamax_sage" else a for a in _optimizer_of("sage"))
    one_criterion = "two criterions; a run has one --criterion"
    frees = "FreeLB's task refuses criterions that perturb the token embeddings themselves"
    return (
        Combination(
            ("childtuning_d", "hype_n"),
            HYPE_CRITERION + _HYPE_NOISE + ADAM_CHILDTUNING + CHILDTUNING_D,
            None,
            "HyPe paper: HyPe on top of ChildTuning-D (the Fisher pass runs with HyPe's noise, in train mode)",
        ),
        Combination(("childtuning_f", "r3f"), R3F + ADAM_CHILDTUNING + CHILDTUNING_F, None, "loss and update mask"),
        Combination(
            ("childtuning_d", "sage"),
            VANILLA_LOSS + sage_childtuning + CHILDTUNING_D,
            None,
            "SAGE's steps on the child network (its sensitivity sees the masked gradient)",
        ),
        Combination(
            ("childtuning_d", "pats"),
            VANILLA_LOSS + _optimizer_of("pats") + CHILDTUNING_D,
            "--childtuning-mode",
            "no adamax_pats_childtuning: masked entries have zero sensitivity, so PATS would give them its largest "
            "noise (baselines.md §8)",
        ),
        Combination(("smart", "hype_n"), SMART + _HYPE_NOISE + ADAM, None, "HyPe noise in every SMART pass"),
        Combination(("smart", "pats"), SMART + _optimizer_of("pats"), None, "loss and optimizer are independent"),
        Combination(("smart", "r3f"), SMART + R3F[2:] + ADAM, "--r3f-lambda", one_criterion),
        Combination(("childtuning_f", "smart"), SMART + ADAM_CHILDTUNING + CHILDTUNING_F, None, "loss and mask"),
        Combination(("freelb", "hype_n"), FREELB + HYPE_CRITERION + _HYPE_NOISE + ADAM, None, "HyPe noise repeats"),
        Combination(("freelb", "sage"), FREELB + VANILLA_LOSS + _optimizer_of("sage"), None, "task and optimizer"),
        Combination(
            ("childtuning_d", "freelb"),
            FREELB + VANILLA_LOSS + ADAM_CHILDTUNING + CHILDTUNING_D,
            None,
            "the Fisher pass uses the plain task loss (no adversarial pass), as the reference's",
        ),
        Combination(("freelb", "r3f"), FREELB + R3F + ADAM, "--criterion", frees),
        Combination(("freelb", "smart"), FREELB + SMART + ADAM, "--criterion", frees),
        Combination(("freelb", "neftune"), FREELB + NEFTUNE + ADAM, "--criterion", frees),
    )


COMBINATIONS: dict[str, Combination] = {c.name: c for c in _combinations()}


# the optimizer flags every method of a family shares (the README lists them once, above the table)
FAMILY_FLAGS = {"adam": (ADAM,), "adamax": (MTDNN_ADAMAX, NO_DECAY_GROUPS)}


def methods_table_markdown() -> str:
    """The README's method table (between the `methods-table` markers), one row per method."""
    lines = ["Optimizer flags each method of a family carries (left out of the flags column):", ""]
    for family, blocks in FAMILY_FLAGS.items():
        shown = " + ".join(f"`{shlex.join(b)}`" for b in blocks)
        lines.append(f"- {family}: {shown}" + (" (the second part: our optimizers only)" if len(blocks) > 1 else ""))
    lines += ["", "| method | label | compared with | family | flags | recipe source |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        flags: Sequence[str] = m.flags
        for block in FAMILY_FLAGS[m.optimizer_family]:
            flags = _without(flags, block)
        lines.append(
            f"| `{m.name}` | {m.label} | {f'`{m.baseline}`' if m.baseline else '(baseline)'} | "
            f"{m.optimizer_family} | {_cell(shlex.join(flags), code=True)} | {_cell(m.source)} |"
        )
    return "\n".join(lines) + "\n"


def _bash(name: str) -> str:
    """Shell assignments for glue.sh / seq2seq.sh: METHOD_FLAGS (array), METHOD_FAMILY, METHOD_SCHEDULE."""
    m = get_method(name)
    return (
        f"METHOD_FLAGS=({shlex.join(m.flags)})\nMETHOD_FAMILY={shlex.quote(m.optimizer_family)}\n"
        f"METHOD_SCHEDULE={shlex.quote(str(m.recipe.get('schedule', '')))}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"list": 0, "table": 0, "combinations": 0, "flags": 1, "show": 1, "bash": 1}
    if not argv or argv[0] not in commands or len(argv) != 1 + commands[argv[0]]:
        print(
            "usage: python -m robustft_common.methods {list|table|combinations|flags METHOD|show METHOD|bash METHOD}; "
            f"methods: {', '.join(METHODS)}",
            file=sys.stderr,
        )
        return 2
    command, *rest = argv
    try:
        if command == "list":
            print("\n".join([*METHODS, *SEQ2SEQ_METHODS]))
        elif command == "table":
            print(methods_table_markdown(), end="")
        elif command == "combinations":
            for c in COMBINATIONS.values():
                verdict = "allowed" if c.refused_by is None else f"refused (stops at {c.refused_by})"
                print(f"{c.name}: {verdict}: {c.why}")
        elif command == "flags":
            print(shlex.join(method_flags(rest[0])))
        elif command == "show":
            print(json.dumps(asdict(get_method(rest[0])), indent=1))
        else:
            print(_bash(rest[0]), end="")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
