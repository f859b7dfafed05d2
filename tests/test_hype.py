"""HyPe in-process on tiny real fairseq models: where the noise enters, its distribution, eval
determinism, gradients, variants, flag errors and the noise-effectiveness counts."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.tasks.sentence_prediction import SentencePredictionTask

import hype_src  # noqa: F401  (registers hype_sentence_prediction)
from hype_src.perturbation import (
    attach_hype,
    detach_hype,
    hype_logging_output,
    hype_settings,
    layer_stacks,
)
from tests.fairseq_helpers import REPO

B, T, C = 8, 16, 64


def build(
    *extra,
    arch="roberta_base",
    layers=2,
    eps="0.1",
    hype_type="normal",
    criterion="hype_sentence_prediction",
    user_dir="hype_src",
):
    """A tiny model + criterion (default hype_sentence_prediction), built from real fairseq flags (dropout off)."""
    argv = [
        "/unused",
        "--user-dir",
        str(REPO / user_dir),
        "--task",
        "sentence_prediction",
        "--criterion",
        criterion,
        "--num-classes",
        "2",
        "--arch",
        arch,
        "--encoder-layers",
        str(layers),
        "--encoder-embed-dim",
        str(C),
        "--encoder-ffn-embed-dim",
        "128",
        "--encoder-attention-heads",
        "2",
        "--max-positions",
        "64",
        *(
            [
                "--decoder-layers",
                str(layers),
                "--decoder-embed-dim",
                str(C),
                "--decoder-ffn-embed-dim",
                "128",
                "--decoder-attention-heads",
                "2",
            ]
            if "bart" in arch
            else []
        ),
        "--dropout",
        "0",
        "--attention-dropout",
        "0",
        "--activation-dropout",
        "0",
        "--hype-type",
        hype_type,
        "--hype-eps",
        eps,
        *extra,
    ]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    words = Dictionary()
    for i in range(40):
        words.add_symbol(f"w{i}")
    labels = Dictionary()
    for name in ("pos", "neg"):
        labels.add_symbol(name)
    task = SentencePredictionTask(cfg.task, words, labels)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return model, criterion, cfg.criterion


def make_sample(seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 44, (B, T), generator=g)
    tokens[:, 0] = 0  # <s>
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g) if padded else torch.full((B,), T)
    lengths[0] = T
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2  # </s>
        tokens[i, n:] = 1  # right padding
    return {
        "net_input": {"src_tokens": tokens, "src_lengths": lengths},
        "target": torch.randint(0, 2, (B,), generator=g),
        "ntokens": int(lengths.sum()),
    }


def bart_input(sample):
    tokens = sample["net_input"]["src_tokens"]
    prev = torch.cat([torch.full((B, 1), 2), tokens[:, :-1]], dim=1)
    return dict(sample["net_input"], prev_output_tokens=prev)


class Recorder:
    """Clean input (pre-hook run before HyPe's), noisy input (after HyPe's) and output of each layer."""

    def __init__(self, layers):
        self.clean, self.noisy, self.out, self.handles = [], [], [], []
        for layer in layers:
            self.handles += [
                layer.register_forward_pre_hook(lambda m, a: self.clean.append(a[0].detach().clone()), prepend=True),
                layer.register_forward_pre_hook(lambda m, a: self.noisy.append(a[0].detach().clone())),
                layer.register_forward_hook(
                    lambda m, a, o: self.out.append((o[0] if isinstance(o, tuple) else o).detach().clone())
                ),
            ]

    def noise(self):
        return [(n.double() - c.double()) for n, c in zip(self.noisy, self.clean)]


def encoder_layers(model):
    return layer_stacks(model)[0][1]


def features(model, sample):
    return model(**sample["net_input"], features_only=True)[0]


# -- where the noise enters ------------------------------------------------------------------------
def test_noise_enters_every_layer_input_and_not_after_the_last():
    model, criterion, cfg = build(layers=3)
    model.train()
    attach_hype(model, cfg)
    layers = encoder_layers(model)
    rec = Recorder(layers)
    embedded = []
    model.encoder.sentence_encoder.dropout_module.register_forward_hook(
        lambda m, a, o: embedded.append(o.detach().clone())
    )
    sample = make_sample()
    out = features(model, sample)

    assert len(rec.clean) == len(rec.noisy) == len(layers) == 3  # one injection per layer, one forward
    # Layer 0's clean input is the embedding output (after layernorm + dropout; pads zeroed, T x B x C).
    pad = sample["net_input"]["src_tokens"].eq(1).t().unsqueeze(-1)
    assert torch.equal(rec.clean[0], embedded[0].transpose(0, 1).masked_fill(pad, 0))
    for i in range(1, len(layers)):
        assert torch.equal(rec.clean[i], rec.out[i - 1])  # nothing else added between layers
    for noise in rec.noise():
        assert noise.abs().min() > 0 and noise.std().item() == pytest.approx(0.1, rel=0.05)
    # The last layer's output reaches the caller unperturbed.
    assert torch.equal(out, rec.out[-1].transpose(0, 1))


def _check_distribution(noise: torch.Tensor, noise_type: str, eps: float):
    n = noise.numel()
    mean, std = noise.mean().item(), noise.std().item()
    tol = 1e-6  # rounding of (x + n) - x in fp32 at |x| ~ 1
    if noise_type == "normal":
        assert abs(mean) < 5 * eps / math.sqrt(n)
        assert std == pytest.approx(eps, rel=0.04)
        assert (noise.abs() < eps).double().mean().item() == pytest.approx(0.6827, abs=0.02)
        assert noise.abs().max() > 3 * eps  # unbounded tails, not a clipped/uniform law
    elif noise_type == "uniform":
        assert abs(mean) < 5 * eps / math.sqrt(3 * n)
        assert std == pytest.approx(eps / math.sqrt(3), rel=0.04)
        assert noise.min() >= -eps - tol and noise.max() <= eps + tol
        assert noise.min() < -0.99 * eps and noise.max() > 0.99 * eps
    else:  # uniform_one_sided
        assert abs(mean - eps / 2) < 5 * eps / math.sqrt(12 * n)
        assert std == pytest.approx(eps / math.sqrt(12), rel=0.04)
        assert noise.min() >= -tol and noise.max() <= eps + tol
        assert noise.min() < 0.01 * eps and noise.max() > 0.99 * eps


@pytest.mark.parametrize(
    "flags,noise_type",
    [
        ((), "normal"),
        (("--hype-type", "uniform"), "uniform"),
        (("--hype-type", "uniform", "--hype-uniform", "one_sided"), "uniform_one_sided"),
    ],
)
def test_noise_distribution_is_fresh_and_iid(flags, noise_type):
    model, _, cfg = build(*flags, eps="0.05")
    assert hype_settings(cfg).noise_type == noise_type
    model.train()
    attach_hype(model, cfg)
    rec = Recorder(encoder_layers(model))
    features(model, make_sample())
    features(model, make_sample())
    noises = rec.noise()  # 2 forwards x 2 layers, B*T*C entries each
    for noise in noises:
        _check_distribution(noise, noise_type, 0.05)
    # i.i.d. across layers and steps: pairwise correlations ~ N(0, 1/n)
    flat = [nz.flatten() - nz.mean() for nz in noises]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            corr = (flat[i] @ flat[j]) / (flat[i].norm() * flat[j].norm())
            assert abs(corr.item()) < 5 / math.sqrt(B * T * C)


def test_eval_is_bit_identical_with_and_without_hype():
    model, _, cfg = build()
    sample = make_sample()
    model.eval()
    with torch.no_grad():
        clean = features(model, sample)
        attach_hype(model, cfg)
        assert torch.equal(features(model, sample), clean)
        assert hype_logging_output(model) == {"hype_noise_effective_num": 0, "hype_noise_effective_den": 0}
        # the same model in training mode is perturbed (dropout is off, so only HyPe can differ)
        model.train()
        noisy = features(model, sample)
        detach_hype(model)
        vanilla = features(model, sample)
    assert not torch.equal(noisy, vanilla)
    # small at real tokens (pads, zeroed by fairseq then perturbed and layer-normed, may move a lot)
    real = sample["net_input"]["src_tokens"].ne(1)
    assert (noisy - vanilla)[real].abs().max() < 1.0


def test_gradients_match_manually_perturbed_forward():
    model, criterion, cfg = build(eps="0.01")
    model.train()
    sample = make_sample()
    torch.manual_seed(123)
    loss, _, _ = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # Independent computation: the encoder loop by hand, with N(0, eps^2) noise drawn in the same order.
    detach_hype(model)
    torch.manual_seed(123)
    encoder = model.encoder.sentence_encoder
    tokens = sample["net_input"]["src_tokens"]
    pad = tokens.eq(1)
    x, _ = encoder.forward_embedding(tokens)
    x = (x * (1 - pad.unsqueeze(-1).type_as(x))).transpose(0, 1)
    for layer in encoder.layers:
        x = layer(x + 0.01 * torch.randn(x.shape), encoder_padding_mask=pad)
    logits = model.classification_heads["sentence_classification_head"](x.transpose(0, 1))
    ref = F.nll_loss(F.log_softmax(logits, dim=-1, dtype=torch.float32), sample["target"], reduction="sum")
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


# -- variants --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,perturbed",
    [
        (("--hype-top-layers", "1", "--hype-low-layers", "1"), [0, 3]),
        (("--hype-top-layers", "2"), [2, 3]),
        (("--hype-low-layers", "1"), [0]),
        ((), [0, 1, 2, 3]),
    ],
)
def test_top_and_low_layers(flags, perturbed):
    model, _, cfg = build(*flags, layers=4)
    model.train()
    attach_hype(model, cfg)
    rec = Recorder(encoder_layers(model))
    features(model, make_sample())
    changed = [i for i, nz in enumerate(rec.noise()) if nz.abs().max() > 0]
    assert changed == perturbed


@pytest.mark.parametrize("flag,layer_inputs", [("--hype-intermediate", True), ("--hype-only-intermediate", False)])
def test_intermediate_noise_on_post_attention_state(flag, layer_inputs):
    model, _, cfg = build(flag)
    model.train()
    attach_hype(model, cfg)
    layers = encoder_layers(model)
    rec = Recorder(layers)
    inter = []
    for layer in layers:  # registered after HyPe's hook: sees the perturbed output; recompute the clean one
        norm = layer.self_attn_layer_norm
        norm.register_forward_hook(lambda m, a, o: inter.append((o - m.forward(a[0])).detach().double()))
    features(model, make_sample())
    assert len(inter) == len(layers)
    for noise in inter:
        _check_distribution(noise, "normal", 0.1)
    for noise in rec.noise():
        assert (noise.abs().max() > 0) == layer_inputs


def test_encoder_decoder_layers_with_hype_decoder():
    for flags, decoder_noise in (((), False), (("--hype-decoder",), True)):
        model, _, cfg = build(*flags, arch="bart_base")
        model.train()
        attach_hype(model, cfg)
        enc, dec = Recorder(model.encoder.layers), Recorder(model.decoder.layers)
        model(**bart_input(make_sample()), features_only=True)
        assert len(enc.noisy) == len(dec.noisy) == 2
        for noise in enc.noise():
            assert noise.std().item() == pytest.approx(0.1, rel=0.05)
        for noise in dec.noise():
            if decoder_noise:
                assert noise.std().item() == pytest.approx(0.1, rel=0.05)
            else:
                assert noise.abs().max() == 0


def test_hyperdecoder_arch_gets_encoder_and_decoder_noise():
    try:
        from fairseq.models import ARCH_MODEL_REGISTRY

        import hyperdecoder_src  # noqa: F401
    except Exception as err:  # built in parallel: runs once the package imports
        pytest.skip(f"hyperdecoder_src not importable yet: {err}")
    if "hyperdecoder_bart_tiny" not in ARCH_MODEL_REGISTRY:
        pytest.skip("hyperdecoder_bart_tiny is not registered yet")
    model, _, cfg = build("--hype-decoder", arch="hyperdecoder_bart_tiny")
    model.train()
    attach_hype(model, cfg)
    enc, dec = Recorder(model.encoder.layers), Recorder(model.decoder.layers)
    model(**bart_input(make_sample()), features_only=True)
    assert len(dec.noisy) == 2 and len(enc.noisy) >= 2  # generated encoder adapters: 2 encoder passes
    for noise in enc.noise() + dec.noise():
        assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_intermediate_on_decoder_uses_post_cross_attention_norm():
    model, _, cfg = build("--hype-decoder", "--hype-only-intermediate", arch="bart_base")
    model.train()
    attach_hype(model, cfg)
    hooked = [len(layer.encoder_attn_layer_norm._forward_hooks) for layer in model.decoder.layers]
    assert hooked == [1, 1]
    assert all(len(layer.self_attn_layer_norm._forward_hooks) == 0 for layer in model.decoder.layers)
    assert all(len(layer.self_attn_layer_norm._forward_hooks) == 1 for layer in model.encoder.layers)


# -- lifecycle, flags, logging ---------------------------------------------------------------------
def _n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_attach_is_idempotent_and_follows_the_flags():
    model, _, cfg = build()
    attach_hype(model, cfg)
    attach_hype(model, cfg)
    assert _n_hooks(model) == 2
    cfg.hype_intermediate = True
    attach_hype(model, cfg)
    assert _n_hooks(model) == 4
    # switching HyPe off (with the other --hype-* flags back at their defaults) removes every hook
    cfg.hype_type, cfg.hype_intermediate, cfg.hype_eps = "none", False, 1e-5
    attach_hype(model, cfg)
    assert _n_hooks(model) == 0 and hype_logging_output(model) == {}


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("hype_eps", -1.0, "--hype-eps"),
        ("hype_eps", float("nan"), "--hype-eps"),
        ("hype_type", "gaussian", "--hype-type"),
        ("hype_uniform", "two_sided", "--hype-uniform"),
        ("hype_top_layers", -1, "--hype-top-layers"),
    ],
)
def test_bad_flag_values_name_the_flag(field, value, flag):
    _, _, cfg = build()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=flag):
        hype_settings(cfg)


def test_bad_flag_combinations_name_the_flag():
    with pytest.raises(ValueError, match="--hype-uniform"):
        build("--hype-uniform", "one_sided")  # with --hype-type normal: fails when the criterion is built
    with pytest.raises(ValueError, match="--hype-only-intermediate"):
        build("--hype-only-intermediate", "--hype-low-layers", "1")
    model, _, cfg = build("--hype-top-layers", "3")
    with pytest.raises(ValueError, match="--hype-top-layers: 3 exceeds the 2 encoder layers"):
        attach_hype(model, cfg)
    model, _, cfg = build("--hype-decoder")
    with pytest.raises(ValueError, match="--hype-decoder"):
        attach_hype(model, cfg)
    model, _, cfg = build("--hype-intermediate", "--encoder-normalize-before")
    with pytest.raises(ValueError, match="--hype-intermediate: encoder layer 0 is pre-LN"):
        attach_hype(model, cfg)


def test_criterion_logs_noise_effective_counts_and_resets():
    model, criterion, cfg = build(eps="1e-5")
    model.train()
    sample = make_sample()
    _, _, log = criterion(model, sample)
    num, den = log["hype_noise_effective_num"], log["hype_noise_effective_den"]
    assert den == 2 * B * T * C
    assert 0.98 < num.item() / den <= 1.0  # fp32: nearly every entry moves
    assert hype_logging_output(model) == {"hype_noise_effective_num": 0, "hype_noise_effective_den": 0}
    model.eval()
    _, _, log = criterion(model, sample)
    assert log["hype_noise_effective_den"] == 0


def test_r3f_counts_both_passes_and_validation_logs_no_hype_noise():
    """A criterion with a second (R3F noisy) pass: HyPe's count covers both passes of the call, and none of
    it reaches the next call, e.g. a validation batch (which adds no noise)."""
    model, criterion, cfg = build("--eps", "1e-3", eps="1e-3", criterion="sentence_prediction_r3f", user_dir="robustft")
    sample = make_sample()
    model.train()
    _, _, log = criterion(model, sample)
    per_pass = 2 * B * T * C  # 2 layers, every entry of each layer input
    assert log["hype_noise_effective_den"] == 2 * per_pass  # clean + noisy pass
    assert 0.98 < log["hype_noise_effective_num"].item() / (2 * per_pass) <= 1.0
    model.eval()
    _, _, log = criterion(model, sample)
    assert log["hype_noise_effective_num"] == log["hype_noise_effective_den"] == 0
    # a stray training-mode forward outside a criterion call is not reported with the next call either
    model.train()
    features(model, sample)
    model.eval()
    assert criterion(model, sample)[2]["hype_noise_effective_den"] == 0


def test_low_precision_warns_and_counts_vanishing_noise(caplog):
    model, criterion, cfg = build(eps="1e-5")
    model.to(torch.bfloat16).train()
    with caplog.at_level(logging.WARNING, logger="hype_src.perturbation"):
        # no padding: fairseq zeroes pad rows, and any noise moves a zero
        _, _, log = criterion(model, make_sample(padded=False))
    assert any("below the bfloat16 resolution" in r.getMessage() for r in caplog.records)
    ratio = log["hype_noise_effective_num"].item() / log["hype_noise_effective_den"]
    # Independent estimate: the fraction of bf16 activations that eps-scale noise can move at all.
    x = torch.randn(100_000).to(torch.bfloat16)
    moved = ((x.float() + 1e-5 * torch.randn(100_000)).to(torch.bfloat16) != x).double().mean().item()
    assert 0 < ratio < 0.02 and moved < 0.02
    assert ratio == pytest.approx(moved, abs=0.005)
