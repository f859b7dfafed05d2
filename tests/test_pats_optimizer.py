"""Unit tests of the PATS / SAGE / NoisyTune math against independent float64 formulas and fairseq's
own Adamax (no fairseq-train here; see test_pats_e2e.py)."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from fairseq.optim.adamax import Adamax as FairseqAdamaxTorch

from pats_src.pats_adamax import PatsAdamax
from pats_src.sage_adamax import SageAdamax
from pats_src.sensitivity_adamax import SensitivityAdamax, update_seed
from robustft_common import param_filters

ADAMAX = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, bias_correction=True)
OPTIMIZERS = {"pats": PatsAdamax, "sage": SageAdamax}


def reference_pats_step(
    theta,
    grad,
    ema,
    exp_avg,
    exp_inf,
    step,
    z,
    u,
    *,
    lr,
    betas,
    eps,
    weight_decay,
    bias_correction,
    sigma,
    beta,
    kappa,
    pats_eps,
    prob,
    lr_scaled=False,
    ema_bias_correction=False,
    max_ratio=0.0,
):
    """The PATS update of one tensor written out plainly in float64 (spec pats.md §1.2-1.3)."""
    theta, grad = theta.double(), grad.double()
    sensitivity = (theta * grad).abs()
    ema = beta * ema + (1 - beta) * sensitivity
    ema_hat = ema / (1 - beta**step) if ema_bias_correction else ema
    m = betas[0] * exp_avg + (1 - betas[0]) * grad
    v = torch.maximum(betas[1] * exp_inf, grad.abs())
    step_size = lr / (1 - betas[0] ** step) if bias_correction else lr
    new = theta - weight_decay * lr * theta - step_size * m / (v + eps)
    ratio = ema_hat.mean() / (ema_hat + pats_eps)
    keep = (ratio >= kappa) & (u.double() < prob)
    if max_ratio > 0:
        ratio = ratio.clamp(max=max_ratio)
    std = sigma * (lr if lr_scaled else 1.0) * ratio
    return new + torch.where(keep, z.double() * std, torch.zeros_like(std)), ema, m, v


def draws(seed, update, n):
    """The optimizer's documented draw order for one bucket: z ~ N(0,1)^n, then u ~ U[0,1)^n."""
    gen = torch.Generator().manual_seed(update_seed(seed, update))
    return torch.randn(n, generator=gen), torch.rand(n, generator=gen)


PATS_CASES = [
    dict(sigma=1e-2, beta=0.75, kappa=5e-3, pats_eps=1e-12, prob=0.5),
    dict(
        sigma=1e-2,
        beta=0.6,
        kappa=0.3,
        pats_eps=1e-6,
        prob=0.8,
        lr_scaled=True,
        ema_bias_correction=True,
        max_ratio=3.0,
    ),
]


def pats_kwargs(case):
    """A PATS_CASES entry as PatsAdamax keywords."""
    return dict(
        pats_noise=case["sigma"],
        pats_beta=case["beta"],
        pats_margin=case["kappa"],
        pats_eps=case["pats_eps"],
        pats_prob=case["prob"],
        pats_noise_lr_scaled=case.get("lr_scaled", False),
        pats_ema_bias_correction=case.get("ema_bias_correction", False),
        pats_max_ratio=case.get("max_ratio", 0.0),
    )


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", PATS_CASES)
def test_pats_steps_on_3x3_match_reference(case, foreach):
    torch.manual_seed(0)
    theta0 = torch.randn(3, 3)
    grads = [torch.randn(3, 3) for _ in range(3)]
    w = theta0.clone().requires_grad_()
    opt = PatsAdamax([w], sensitive=[True], seed=7, foreach=foreach, **pats_kwargs(case), **ADAMAX)
    theta = theta0.double()
    ema = m = v = torch.zeros(3, 3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        z, u = draws(7, t, 9)
        theta, ema, m, v = reference_pats_step(theta, g, ema, m, v, t, z.view(3, 3), u.view(3, 3), **case, **ADAMAX)
        torch.testing.assert_close(w.detach().double(), theta, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[w]["sensitivity"].double(), ema, rtol=1e-6, atol=1e-12)
    assert not torch.equal(w.grad, grads[-1].abs()), "fairseq's adamax quirk (grad.abs_()) not copied"


def _noise_of_one_step(sensitivity_pattern, **pats):
    """Noise the optimizer added in one step, separated from the Adamax update with a twin run."""
    theta = torch.ones_like(sensitivity_pattern)
    grad = sensitivity_pattern.clone()  # |theta * g| = pattern
    noisy = theta.clone().requires_grad_()
    plain = theta.clone().requires_grad_()
    opt = PatsAdamax([noisy], sensitive=[True], seed=3, **pats, **ADAMAX)
    ref = PatsAdamax([plain], sensitive=[False], seed=3, **ADAMAX)
    noisy.grad, plain.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    z, _ = draws(3, 1, theta.numel())
    return (noisy - plain).detach().double(), z.view_as(theta).double()


def test_noise_std_inversely_proportional_to_sensitivity():
    pattern = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    noise, z = _noise_of_one_step(pattern, pats_noise=1e-1, pats_margin=0.0, pats_prob=1.0, pats_eps=1e-12)
    sigma_j = noise / z
    assert torch.all(sigma_j[1:] < sigma_j[:-1]), sigma_j
    # sigma_j * sbar_j is the constant sigma * mean(sbar) (sbar = (1 - beta) * pattern after step 1)
    sbar = 0.25 * pattern.double()
    torch.testing.assert_close(sigma_j * sbar, torch.full_like(sbar, 1e-1 * sbar.mean().item()), rtol=1e-4, atol=0)


def test_margin_zeroes_noise_of_the_most_sensitive_entries():
    pattern = torch.full((50,), 1e-4)
    pattern[:3] = torch.tensor([1.0, 2.0, 5.0])  # ratio = mean/sbar < kappa for these
    noise, _ = _noise_of_one_step(pattern, pats_noise=1e-3, pats_margin=0.2, pats_prob=1.0)
    assert torch.all(noise[:3] == 0)
    assert torch.all(noise[3:] != 0)
    # kappa = 0 disables the margin
    noise, _ = _noise_of_one_step(pattern, pats_noise=1e-3, pats_margin=0.0, pats_prob=1.0)
    assert torch.all(noise != 0)


def test_bernoulli_rate():
    n, prob = 200_000, 0.3
    pattern = torch.rand(n) + 0.5
    noise, _ = _noise_of_one_step(pattern, pats_noise=1e-3, pats_margin=0.0, pats_prob=prob)
    rate = (noise != 0).double().mean().item()
    assert abs(rate - prob) < 5 * (prob * (1 - prob) / n) ** 0.5, rate


def _fairseq_adamax_trajectory(theta0, grads, **kw):
    w = theta0.clone().requires_grad_()
    opt = FairseqAdamaxTorch([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("mode", ["pats", "sage"])
@pytest.mark.parametrize("foreach", [True, False])
def test_excluded_parameters_get_fairseq_adamax_bit_exactly(mode, foreach):
    torch.manual_seed(1)
    a0, b0 = torch.randn(4, 5), torch.randn(7)
    grads = [(torch.randn(4, 5), torch.randn(7)) for _ in range(4)]
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    method = {"pats": dict(pats_noise=1e-2), "sage": {}}[mode]
    opt = OPTIMIZERS[mode]([a, b], sensitive=[True, False], foreach=foreach, **method, **ADAMAX)
    for ga, gb in grads:
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
    expected_b = _fairseq_adamax_trajectory(b0, [gb for _, gb in grads], **ADAMAX)
    assert torch.equal(b.detach(), expected_b)
    expected_a = _fairseq_adamax_trajectory(a0, [ga for ga, _ in grads], **ADAMAX)
    assert not torch.equal(a.detach(), expected_a)  # the selected tensor did get PATS / SAGE


def test_noise_off_is_fairseq_adamax_bit_exactly():
    torch.manual_seed(2)
    a0 = torch.randn(6, 6)
    grads = [torch.randn(6, 6) for _ in range(3)]
    a = a0.clone().requires_grad_()
    opt = PatsAdamax([a], sensitive=[True], pats_noise=0.0, **ADAMAX)
    for g in grads:
        a.grad = g.clone()
        opt.step()
    assert torch.equal(a.detach(), _fairseq_adamax_trajectory(a0, grads, **ADAMAX))


@pytest.mark.parametrize("foreach", [True, False])
def test_sage_steps_match_reference(foreach):
    torch.manual_seed(3)
    theta0 = torch.randn(3, 3)
    grads = [torch.randn(3, 3) for _ in range(3)]
    beta3, e = 0.75, 1e-12
    w = theta0.clone().requires_grad_()
    opt = SageAdamax([w], sensitive=[True], sage_beta3=beta3, sage_eps=e, foreach=foreach, **ADAMAX)
    theta = theta0.double()
    ibar = m = v = torch.zeros(3, 3, dtype=torch.float64)
    (b1, b2), lr, wd = ADAMAX["betas"], ADAMAX["lr"], ADAMAX["weight_decay"]
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        g = g.double()
        i_t = (theta * g).abs()
        ibar = beta3 * ibar + (1 - beta3) * i_t
        m = b1 * m + (1 - b1) * g
        v = torch.maximum(b2 * v, g.abs())
        direction = m / (v + ADAMAX["eps"]) / (1 - b1**t) + wd * theta
        factor = (i_t - ibar).abs() / (ibar + e)
        if t == 1:
            torch.testing.assert_close(factor, torch.full_like(factor, beta3 / (1 - beta3)))
        theta = theta - lr * factor * direction
        torch.testing.assert_close(w.detach().double(), theta, rtol=1e-6, atol=1e-7)


def test_noisytune_scale_skip_and_reproducibility():
    torch.manual_seed(4)
    big, single = torch.randn(300, 20) * 0.05, torch.tensor([0.7])
    params = [big.clone(), single.clone()]
    opt = SensitivityAdamax(params, seed=11)
    report = opt.noisytune_(0.15)
    assert report == {"perturbed": 1, "skipped_single_element": 1}
    assert torch.equal(params[1], single)
    delta = params[0] - big
    half_width = 0.15 / 2 * big.std().item()
    assert delta.abs().max().item() <= half_width * (1 + 1e-5)
    assert delta.abs().max().item() > 0.99 * half_width  # 6000 uniform draws reach the edge
    gen = torch.Generator().manual_seed(update_seed(11, 0, stream=1))
    expected = (torch.rand(big.shape, generator=gen) - 0.5) * 0.15 * big.std()
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)
    again = [big.clone(), single.clone()]
    SensitivityAdamax(again, seed=11).noisytune_(0.15)
    assert torch.equal(again[0], params[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_do_the_math_in_fp32(dtype):
    """--memory-efficient-fp16 path: fp16/bf16 params, fp32 state; result = fp32 result rounded."""
    torch.manual_seed(5)
    theta0 = torch.randn(8, 8).to(dtype).float()
    grad = torch.randn(8, 8)
    low = theta0.to(dtype).requires_grad_()
    full = theta0.clone().requires_grad_()
    opts = [PatsAdamax([p], sensitive=[True], seed=2, pats_noise=1e-2, **ADAMAX) for p in (low, full)]
    low.grad, full.grad = grad.to(dtype), grad.to(dtype).float()
    for o in opts:
        o.step()
    assert opts[0].state[low]["exp_avg"].dtype == torch.float32
    assert torch.equal(low.detach(), full.detach().to(dtype))
    # resume keeps the fp32 moments (torch would cast them to the param dtype)
    fresh = PatsAdamax([low], sensitive=[True], seed=2, pats_noise=1e-2, **ADAMAX)
    fresh.load_state_dict(copy.deepcopy(opts[0].state_dict()))
    assert fresh.state[low]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[low]["exp_avg"], opts[0].state[low]["exp_avg"])


def test_state_dict_resume_is_exact():
    torch.manual_seed(6)
    a0, b0 = torch.randn(5, 5), torch.randn(5)
    grads = [(torch.randn(5, 5), torch.randn(5)) for _ in range(4)]

    def make(a, b):
        return PatsAdamax([a, b], sensitive=[True, True], seed=9, pats_noise=1e-2, **ADAMAX)

    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = make(a, b)
    for ga, gb in grads:
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    first = make(a2, b2)
    for ga, gb in grads[:2]:
        a2.grad, b2.grad = ga.clone(), gb.clone()
        first.step()
    saved = copy.deepcopy(first.state_dict())
    assert saved["robustft"]["updates"] == 2
    second = make(a2, b2)
    second.load_state_dict(saved)
    for ga, gb in grads[2:]:
        a2.grad, b2.grad = ga.clone(), gb.clone()
        second.step()
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())


ROBERTA_NAMES = [
    "encoder.sentence_encoder.embed_tokens.weight",
    "encoder.sentence_encoder.embed_positions.weight",
    "encoder.sentence_encoder.layernorm_embedding.weight",
    "encoder.sentence_encoder.layers.0.self_attn.k_proj.weight",
    "encoder.sentence_encoder.layers.0.self_attn.k_proj.bias",
    "encoder.sentence_encoder.layers.0.self_attn.out_proj.weight",
    "encoder.sentence_encoder.layers.0.self_attn_layer_norm.weight",
    "encoder.sentence_encoder.layers.11.fc1.weight",
    "encoder.sentence_encoder.layers.11.fc2.bias",
    "encoder.sentence_encoder.layers.11.final_layer_norm.bias",
    "encoder.lm_head.dense.weight",
    "encoder.lm_head.layer_norm.weight",
    "classification_heads.sentence_classification_head.dense.weight",
    "classification_heads.sentence_classification_head.out_proj.bias",
]
EXPECTED_DEFAULT = {
    "encoder.sentence_encoder.layers.0.self_attn.k_proj.weight",
    "encoder.sentence_encoder.layers.0.self_attn.k_proj.bias",
    "encoder.sentence_encoder.layers.0.self_attn.out_proj.weight",
    "encoder.sentence_encoder.layers.11.fc1.weight",
    "encoder.sentence_encoder.layers.11.fc2.bias",
}


def test_default_filter_is_encoder_layers_without_layer_norm():
    mask = param_filters.select(
        ROBERTA_NAMES,
        param_filters.ENCODER_LAYERS,
        param_filters.LAYER_NORM,
        "--pats-param-include",
        "--pats-param-exclude",
    )
    assert {n for n, m in zip(ROBERTA_NAMES, mask) if m} == EXPECTED_DEFAULT
    bart = [
        "encoder.layers.3.fc1.weight",
        "encoder.layers.3.self_attn_layer_norm.bias",
        "decoder.layers.0.fc1.weight",
        "encoder.embed_tokens.weight",
    ]
    mask = param_filters.select(bart, param_filters.ENCODER_LAYERS, param_filters.LAYER_NORM, "--a", "--b")
    assert mask == [True, False, False, False]


def test_filter_matching_nothing_names_the_flag():
    with pytest.raises(ValueError, match="--sage-param-include"):
        param_filters.select(ROBERTA_NAMES, r"decoder\.", "", "--sage-param-include", "--sage-param-exclude")
    with pytest.raises(ValueError, match="--pats-param-exclude: not a valid regular expression"):
        param_filters.select(ROBERTA_NAMES, ".*", "(", "--pats-param-include", "--pats-param-exclude")


def test_names_recovered_by_tags_or_published_list():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    copies = [p.detach().clone() for p in model.parameters()]  # like FP16Optimizer's fp32 copies
    assert param_filters.names_for_params(copies) is None
    with param_filters.publish_param_names(model.named_parameters()):
        assert param_filters.names_for_params(copies) == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert param_filters.names_for_params(copies[:1]) is None  # a flat buffer: no names
    param_filters.tag_parameter_names(model, prefixes=["m."])
    assert param_filters.names_for_params(list(model.parameters()))[0] == "m.0.weight"


def _wrapper_cfg(config=None, **overrides):
    """The config fairseq would build for `config` (default AdamaxPatsConfig) from its flag defaults."""
    import dataclasses
    from types import SimpleNamespace

    from pats_src.optim import AdamaxPatsConfig

    values = {f.name: f.default for f in dataclasses.fields(config or AdamaxPatsConfig)}
    values.update(
        lr=[1e-3], seed=1, restore_file="checkpoint_last.pt", finetune_from_model=None, save_dir="/nonexistent"
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_fairseq_wrapper_errors_name_the_flag():
    from pats_src.optim import FairseqAdamaxPats

    flat = [torch.zeros(10, requires_grad=True)]  # what --fp16 without --fp16-no-flatten-grads hands over
    with pytest.raises(ValueError, match="--fp16-no-flatten-grads"):
        FairseqAdamaxPats(_wrapper_cfg(), flat)
    with pytest.raises(ValueError, match=r"--pats-prob: must be in \[0, 1\], got 1.5"):
        FairseqAdamaxPats(_wrapper_cfg(pats_prob=1.5), flat)
    with pytest.raises(ValueError, match="--noisytune-lambda"):
        FairseqAdamaxPats(_wrapper_cfg(pats_noise=0.0, noisytune_lambda=0.15), flat)
    # noise off needs no names: plain Adamax on whatever it gets
    assert FairseqAdamaxPats(_wrapper_cfg(pats_noise=0.0), flat).supports_flat_params is False


@pytest.mark.parametrize("flag", ["pats_eps", "pats_margin", "pats_noise", "pats_max_ratio"])
def test_infinite_constants_are_rejected(flag):
    from pats_src.optim import FairseqAdamaxPats

    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        FairseqAdamaxPats(_wrapper_cfg(**{flag: float("inf")}), [torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("case", PATS_CASES)
def test_cpu_chunked_noise_path_equals_flat_path_bit_for_bit(case, monkeypatch):
    """The CPU path (tensor by tensor, in cache-sized chunks, int32 masks) against the flat bucket path
    (accelerators): same parameters, EMA and statistics, over several buckets and partial chunks, and a
    NaN gradient entry (its tensor's ratio is NaN: no noise there in either path)."""
    import functools

    import pats_src.pats_adamax as pa

    monkeypatch.setattr(pa, "noise_buckets", functools.partial(pa.noise_buckets, limit=300))
    torch.manual_seed(8)
    shapes = [(30, 7), (5,), (400,), (13, 13), (64,)]
    theta0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    grads[1][3][2, 2] = float("nan")
    runs = []
    for chunk in (64, 0):
        params = [t.clone().requires_grad_() for t in theta0]
        opt = PatsAdamax(params, sensitive=[True] * len(params), seed=5, log_stats=True, **pats_kwargs(case), **ADAMAX)
        opt.cpu_chunk_numel = chunk
        stats = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            stats.append(dict(opt.last_stats))
        runs.append(([p.detach() for p in params], [opt.state[p]["sensitivity"] for p in params], stats))
    (chunked, ema_c, stats_c), (flat, ema_f, stats_f) = runs
    for a, b in zip(chunked + ema_c, flat + ema_f):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert stats_c == stats_f
    assert torch.isnan(chunked[3]).any() and not torch.isnan(chunked[0]).any()
    assert stats_c[0]["pats_frac_noised"] > 0


def _tiny_roberta():
    """A real fairseq RoBERTa (1 layer, dim 16) with a classification head: fairseq's parameter names."""
    import argparse

    from fairseq.data import Dictionary
    from fairseq.models.roberta.model import RobertaModel, base_architecture

    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(
        encoder_layers=1, encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_attention_heads=2, max_positions=32
    )
    base_architecture(args)
    task = SimpleNamespace(source_dictionary=dictionary, dictionary=dictionary)
    model = RobertaModel.build_model(args, task)
    model.register_classification_head("sentence_classification_head", num_classes=2)
    return model


def test_no_decay_is_every_bias_and_layer_norm_of_real_fairseq_roberta():
    model = _tiny_roberta()
    regex = re.compile(param_filters.NO_DECAY)
    exempt = {n for n, _ in model.named_parameters() if regex.search(n)}
    # independently, from the modules: a parameter called `bias`, or any parameter of a LayerNorm
    expected = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, torch.nn.LayerNorm):
                expected.add(f"{module_name}.{name}" if module_name else name)
    assert exempt == expected
    assert {
        "encoder.sentence_encoder.layernorm_embedding.weight",
        "encoder.lm_head.bias",
        "encoder.sentence_encoder.layers.0.final_layer_norm.weight",
        "classification_heads.sentence_classification_head.out_proj.bias",
    } <= exempt
    assert len(exempt) < len(list(model.parameters())) - 5  # the weight matrices keep their decay
    # other fairseq models: BART's encoder LayerNorms, older RoBERTa's emb_layer_norm
    assert [
        bool(regex.search(n))
        for n in [
            "encoder.layer_norm.weight",
            "encoder.layernorm_embedding.bias",
            "decoder.sentence_encoder.emb_layer_norm.weight",
            "encoder.layers.0.fc1.weight",
            "encoder.embed_tokens.weight",
            "decoder.output_projection.weight",
        ]
    ] == [True] * 3 + [False] * 3


def test_sage_with_sage_settings_matches_float64_reference():
    """adamax_sage with SAGE's code settings (--no-bias-correction, --weight-decay-exclude NO_DECAY),
    against UnstructAwareAdamax written out in float64 (pats.md §2): no bias correction, decay 0.01 only
    on weight matrices, SAGE scaling on the encoder-layer tensors except LayerNorm, plain Adamax elsewhere.
    (eps outside the infinity norm, as fairseq's Adamax; SAGE's code also adds it inside: README.)"""
    from pats_src.optim import AdamaxSageConfig, FairseqAdamaxSage

    torch.manual_seed(9)
    layer = torch.nn.Module()
    layer.fc1, layer.final_layer_norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.layers = torch.nn.ModuleList([layer])
    model.head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    param_filters.tag_parameter_names(model)
    named = dict(model.named_parameters())
    lr, wd, eps, beta3, e = 1e-2, 0.01, 1e-6, 0.75, 1e-12
    opt = FairseqAdamaxSage(
        _wrapper_cfg(
            AdamaxSageConfig,
            lr=[lr],
            weight_decay=wd,
            adamax_eps=eps,
            no_bias_correction=True,
            sage_beta3=beta3,
            weight_decay_exclude=param_filters.NO_DECAY,
        ),
        list(named.values()),
    )
    sage = {"encoder.layers.0.fc1.weight", "encoder.layers.0.fc1.bias"}
    decayed = {"encoder.layers.0.fc1.weight", "head.weight"}
    theta = {n: p.detach().double().clone() for n, p in named.items()}
    m, u, ibar = ({n: torch.zeros_like(t) for n, t in theta.items()} for _ in range(3))
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in named.items()}
        for n, p in named.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, g in grads.items():
            g = g.double()
            m[n] = 0.9 * m[n] + 0.1 * g
            u[n] = torch.maximum(0.999 * u[n], g.abs())
            direction = m[n] / (u[n] + eps) + (wd if n in decayed else 0.0) * theta[n]
            if n in sage:
                i_t = (theta[n] * g).abs()
                ibar[n] = beta3 * ibar[n] + (1 - beta3) * i_t
                direction = (i_t - ibar[n]).abs() / (ibar[n] + e) * direction
            theta[n] = theta[n] - lr * direction
        for n, p in named.items():
            torch.testing.assert_close(p.detach().double(), theta[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("cls", [PatsAdamax, SageAdamax])
def test_no_weight_decay_tensor_gets_fairseq_adamax_without_decay(cls):
    torch.manual_seed(10)
    a0, b0 = torch.randn(4, 5), torch.randn(7)
    grads = [(torch.randn(4, 5), torch.randn(7)) for _ in range(3)]
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = cls([a, b], no_weight_decay=[False, True], **ADAMAX)
    for ga, gb in grads:
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
    assert torch.equal(a.detach(), _fairseq_adamax_trajectory(a0, [ga for ga, _ in grads], **ADAMAX))
    assert torch.equal(
        b.detach(), _fairseq_adamax_trajectory(b0, [gb for _, gb in grads], **{**ADAMAX, "weight_decay": 0.0})
    )


def test_weight_decay_exclude_errors_name_the_flag():
    from pats_src.optim import FairseqAdamaxPats

    model = torch.nn.Linear(2, 2)
    param_filters.tag_parameter_names(model)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="--weight-decay-exclude 'norm' matches no parameter"):
        FairseqAdamaxPats(_wrapper_cfg(pats_param_include=".*", weight_decay_exclude="norm"), params)
    with pytest.raises(ValueError, match="--weight-decay-exclude: not a valid regular expression"):
        FairseqAdamaxPats(_wrapper_cfg(pats_param_include=".*", weight_decay_exclude="("), params)
    wrapper = FairseqAdamaxPats(
        _wrapper_cfg(pats_param_include=".*", weight_decay=0.01, weight_decay_exclude="bias"), params
    )
    groups = [(g["weight_decay"], g["params"]) for g in wrapper.optimizer.param_groups]
    assert groups == [(0.01, [model.weight]), (0.0, [model.bias])]
    flat = [torch.zeros(10, requires_grad=True)]
    with pytest.raises(ValueError, match="--weight-decay-exclude: cannot map"):
        FairseqAdamaxPats(_wrapper_cfg(pats_noise=0.0, weight_decay_exclude=param_filters.NO_DECAY), flat)


@pytest.mark.parametrize("cap", [0.0, 100.0])
def test_log_stats_measure_ratio_and_kicks(cap):
    """--pats-log-stats against the formulas in float64: 990 entries of sensitivity 1, 10 of 1e-6, so
    rho is ~0.99 for the bulk and ~9.9e5 for the ten (kicks ~|z|, i.e. noise as large as the weight)."""
    n, sigma = 1000, 1e-6
    pattern = torch.ones(n)
    pattern[::100] = 1e-6
    theta = torch.ones(n)
    noisy, plain = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    pats = dict(pats_noise=sigma, pats_margin=0.0, pats_prob=1.0, pats_max_ratio=cap)
    opt = PatsAdamax([noisy], sensitive=[True], seed=3, log_stats=True, **pats, **ADAMAX)
    ref = PatsAdamax([plain], sensitive=[False], seed=3, **ADAMAX)
    noisy.grad, plain.grad = pattern.clone(), pattern.clone()
    opt.step()
    ref.step()
    sbar = 0.25 * pattern.double()
    ratio = sbar.mean() / (sbar + 1e-12)
    capped = ratio.clamp(max=cap) if cap else ratio
    noise = draws(3, 1, n)[0].double() * sigma * capped
    kick = noise.abs() / plain.detach().double().abs()
    stats = opt.last_stats
    for k in range(7):
        assert stats[f"pats_frac_ratio_ge_1e{k}"] == (ratio >= 10.0**k).double().mean().item()
    assert stats["pats_frac_ratio_ge_1e5"] == 0.01 and stats["pats_frac_ratio_ge_1e0"] == 0.01  # raw rho
    assert stats["pats_frac_noised"] == 1.0 and stats["pats_frac_zeroed_by_margin"] == 0.0
    assert stats["pats_ratio_max"] == pytest.approx(capped.max().item(), rel=1e-6)
    assert stats["pats_noise_max"] == pytest.approx(noise.abs().max().item(), rel=1e-5)
    assert stats["pats_kick_max"] == pytest.approx(kick.max().item(), rel=1e-5)
    for level in (0.01, 0.1, 1.0):
        assert stats[f"pats_frac_kick_ge_{level:g}"] == (kick >= level).double().mean().item()
    if not cap:
        assert stats["pats_kick_max"] > 1  # an entry kicked by more than its own size in one step
    else:
        assert stats["pats_ratio_max"] == cap and stats["pats_kick_max"] < 1e-3


@pytest.mark.parametrize(
    "flags, cap",
    [
        ({}, 200.0),
        ({"pats_margin": 0.01}, 100.0),
        ({"pats_max_ratio": 0.0}, 0.0),
        ({"pats_margin": 0.0}, 0.0),
        ({"pats_max_ratio": 50.0}, 50.0),
    ],
)
def test_default_cap_on_rho_mirrors_the_margin(flags, cap):
    """--pats-max-ratio defaults to 1/--pats-margin; 0 (or no margin) is the paper's uncapped formula."""
    from pats_src.optim import FairseqAdamaxPats

    model = torch.nn.Linear(2, 2)
    param_filters.tag_parameter_names(model)
    wrapper = FairseqAdamaxPats(_wrapper_cfg(pats_param_include=".*", **flags), list(model.parameters()))
    assert [g["pats_max_ratio"] for g in wrapper.optimizer.param_groups] == [cap]
