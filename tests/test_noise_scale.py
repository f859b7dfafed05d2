"""benchmarks/quality/noise_scale.py and head_scale.py on the tiny fairseq model: the clean pass has no noise,
the noisy pass has exactly the method's noise, NoisyTune's perturbation is measured on a copy; the head's
rebuilt pass is the model's, its Jacobian and R4F's first power iteration are as computed here by hand."""

import copy
import importlib.util
import math

import pytest
import torch

from tests.fairseq_helpers import REPO, sentence_prediction_args

pytestmark = pytest.mark.e2e  # builds the tiny fairseq model through its hydra config


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "quality" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _noise_scale():
    return _script("noise_scale")


@pytest.fixture(scope="module")
def tiny(sp_data, tmp_path_factory):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import robustft  # noqa: F401  (the plugin, as --user-dir imports it)

    argv = [str(a) for a in sentence_prediction_args(sp_data, tmp_path_factory.mktemp("ns"))]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    task.load_dataset("valid")
    ds = task.dataset("valid")
    samples = [ds.collater([ds[i] for i in range(start, start + 8)]) for start in (0, 8)]
    return model, samples


def test_clean_pass_is_noise_free_and_noisy_pass_adds_the_method_noise(tiny):
    ns = _noise_scale()
    model, samples = tiny
    scale = 0.05
    got = ns.measure(model, samples, "hype_n", scale, seed=3)

    # by hand: the same N(0, scale^2) draws, in the same order, added to every layer's input
    gen = torch.Generator().manual_seed(3)
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args: (args[0] + torch.randn(args[0].shape, generator=gen) * scale, *args[1:])
        )
        for layer in ns.layers_of(model)
    ]
    noisy = []
    with torch.no_grad():
        for sample in samples:
            noisy.append(ns.logits(model, sample))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        clean = [ns.logits(model, sample) for sample in samples]
    diff = sum(float((n - c).abs().sum()) for n, c in zip(noisy, clean))
    mag = sum(float(c.abs().sum()) for c in clean)
    assert got["logit_change"] == pytest.approx(diff / mag, rel=1e-5)
    assert got["logit_change"] > 0
    assert got["rms_noise"] == pytest.approx(scale, rel=0.05)
    # the hooks are gone: the model's own pass is the clean one again
    with torch.no_grad():
        assert torch.equal(ns.logits(model, samples[0]), clean[0])
    # no noise, no change
    zero = ns.measure(model, samples, "hype_u", 0.0)
    assert zero["logit_change"] == 0 and zero["representation_change"] == 0


def test_noisytune_is_measured_on_a_copy_with_the_papers_scale(tiny):
    ns = _noise_scale()
    model, samples = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = ns.measure_noisytune(model, samples, 0.15)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # U(-l/2, l/2) * std(W): variance (l std)^2 / 12 per entry, summed over the tensors of >= 2 entries
    big = [p for p in before.values() if p.numel() > 1]
    expected_n2 = sum(p.numel() * (0.15 * float(p.float().std())) ** 2 / 12 for p in big)
    count = sum(p.numel() for p in big)
    assert got["rms_noise"] == pytest.approx(math.sqrt(expected_n2 / count), rel=0.05)
    assert got["representation_change"] > 0 and got["logit_change"] > 0


def _with_delta(model, delta):
    """A forward hook adding delta to the token embeddings' output (the tiny RoBERTa's embed_scale is 1)."""
    emb = model.encoder.sentence_encoder.embed_tokens
    assert getattr(model.encoder.sentence_encoder, "embed_scale", 1.0) in (None, 1.0)
    return emb.register_forward_hook(lambda m, args, out: out + delta)


def _hand_ascent(model, ns, sample, delta, steps, loss_of, step):
    for _ in range(steps):
        delta = delta.detach().requires_grad_()
        handle = _with_delta(model, delta)
        try:
            out = ns.logits(model, sample)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(loss_of(out), delta)
        delta = step(delta.detach(), grad)
    return delta.detach()


@pytest.mark.parametrize("factor", [1.0, 100.0])
def test_freelb_delta_is_its_ascent_on_the_gold_labels_by_hand(tiny, factor):
    ns = _noise_scale()
    model, samples = tiny
    sample = samples[0]
    src = sample["net_input"]["src_tokens"]
    keep = src.ne(1).unsqueeze(-1).float()  # the tiny dictionary's pad is 1
    dim = model.encoder.sentence_encoder.embed_tokens.embedding_dim
    lr, init, bound = (
        float(ns.flag("freelb", f)) * factor for f in ("--freelb-adv-lr", "--freelb-init-mag", "--freelb-max-norm")
    )
    torch.manual_seed(5)
    got, got_keep = ns.adversarial_delta(model, sample, "freelb", factor)
    assert torch.equal(got_keep, keep)

    # by hand: delta_0 = U(-1, 1) * init / sqrt(L_i d) on the non-pad tokens, then K steps of
    # delta + lr g / ||g|| (per sentence), rescaled onto the l2 ball of radius `bound`
    torch.manual_seed(5)
    delta = (torch.rand(*src.shape, dim) * 2 - 1) * keep * init / (keep.sum(dim=(1, 2), keepdim=True) * dim).sqrt()
    with torch.no_grad():
        target = model.get_targets(sample, [ns.logits(model, sample)]).view(-1)

    def step(d, g):
        d = d + lr * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
        size = d.flatten(1).norm(dim=1).view(-1, 1, 1)
        return torch.where(size > bound, d * bound / size, d)

    loss_of = lambda out: torch.nn.functional.cross_entropy(out, target, reduction="sum")  # noqa: E731
    want = _hand_ascent(model, ns, sample, delta, int(ns.flag("freelb", "--freelb-steps")), loss_of, step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * factor)
    norms = got.flatten(1).norm(dim=1)
    assert bool((norms <= bound * (1 + 1e-5)).all())
    assert float((got * (1 - keep)).abs().max()) == 0  # nothing on the pads
    # it is an adversary: the gold labels' loss rises
    with torch.no_grad():
        clean = loss_of(ns.logits(model, sample))
        handle = _with_delta(model, got)
        try:
            adv = loss_of(ns.logits(model, sample))
        finally:
            handle.remove()
    assert float(adv) > float(clean)


def test_smart_delta_is_its_linf_ascent_on_the_symmetric_kl_by_hand(tiny):
    ns = _noise_scale()
    model, samples = tiny
    sample = samples[1]
    src = sample["net_input"]["src_tokens"]
    keep = src.ne(1).unsqueeze(-1).float()
    dim = model.encoder.sentence_encoder.embed_tokens.embedding_dim
    factor = 1000.0
    eta, sigma, eps = (
        float(ns.flag("smart", f)) * factor for f in ("--smart-step-size", "--smart-noise-std", "--smart-eps")
    )
    torch.manual_seed(7)
    got, _ = ns.adversarial_delta(model, sample, "smart", factor)

    torch.manual_seed(7)
    delta = torch.randn(*src.shape, dim) * sigma * keep
    with torch.no_grad():
        p_clean = torch.log_softmax(ns.logits(model, sample), -1)

    def loss_of(out):  # mt-dnn's symmetric KL: only KL(sg P || Q) reaches the perturbed side Q
        return (p_clean.exp() * (p_clean - torch.log_softmax(out, -1))).sum()

    def step(d, g):
        # a pad token's gradient is 0: it gets no step (the kernel's division guard)
        top = g.abs().amax(-1, keepdim=True)
        return (d + eta * torch.where(top > 0, g / top, 0.0)).clamp(-eps, eps) * keep

    want = _hand_ascent(model, ns, sample, delta, int(ns.flag("smart", "--smart-steps")), loss_of, step)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * eps)
    assert float(got.abs().max()) <= eps * (1 + 1e-6)


def test_measure_adversarial_reports_the_deltas_it_applies(tiny):
    ns = _noise_scale()
    model, samples = tiny
    got = ns.measure_adversarial(model, samples, "freelb", 10.0, seed=3)
    # the same deltas again, drawn in the same order from the same seed
    torch.manual_seed(3)
    emb = model.encoder.sentence_encoder.embed_tokens
    n2 = x2 = count = 0.0
    changed = total = 0
    for sample in samples:
        delta, keep = ns.adversarial_delta(model, sample, "freelb", 10.0)
        with torch.no_grad():
            x2 += float((emb(sample["net_input"]["src_tokens"]) * keep).pow(2).sum())
            clean = ns.logits(model, sample)
            handle = _with_delta(model, delta)
            try:
                adv = ns.logits(model, sample)
            finally:
                handle.remove()
        n2 += float(delta.pow(2).sum())
        count += float(keep.sum()) * delta.size(-1)
        changed += int((adv.argmax(-1) != clean.argmax(-1)).sum())
        total += clean.size(0)
    assert got["rms_noise"] == pytest.approx(math.sqrt(n2 / count), rel=1e-5)
    assert got["rms_perturbed"] == pytest.approx(math.sqrt(x2 / count), rel=1e-5)
    assert got["predictions_changed"] == pytest.approx(changed / total)
    assert got["logit_change"] > 0
    # the model is left as it was: no hook, no gradient
    assert all(p.grad is None for p in model.parameters())


def test_head_scale_rebuilds_the_head_and_its_jacobian(tiny):
    hs = _script("head_scale")
    model, samples = tiny
    head = model.classification_heads[hs.HEAD_NAME]
    features, logits = _noise_scale().forward(model, samples[0])
    out = hs.head_pass(head, features, {"dense": 1.0, "out_proj": 1.0})
    assert torch.allclose(out["logits"], logits, atol=1e-6)  # the model's own head, rebuilt
    # by hand: d logits / d x = W_out diag(1 - tanh(z)^2) W_dense, with the matrices scaled
    scales = {"dense": 2.0, "out_proj": 0.5}
    out = hs.head_pass(head, features, scales)
    w_d, w_o = head.dense.weight.detach() * 2.0, head.out_proj.weight.detach() * 0.5
    z = features @ w_d.T + head.dense.bias.detach()
    assert torch.allclose(out["pre_activation"], z, atol=1e-6)
    for i in range(features.size(0)):
        expected = w_o @ torch.diag(1 - torch.tanh(z[i]) ** 2) @ w_d
        assert torch.allclose(out["jacobian"][i], expected, atol=1e-6)
    got = hs.measure(model, samples[:1], scales)
    norms = [float(torch.linalg.matrix_norm(out["jacobian"][i].double(), ord=2)) for i in range(features.size(0))]
    assert got["mean_jacobian_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-9)
    assert got["mean_abs_logit"] == pytest.approx(float(out["logits"].abs().mean()), rel=1e-6)


def test_head_scale_first_forward_sigma_is_one_power_iteration(tiny):
    hs = _script("head_scale")
    model, _ = tiny
    linear = model.classification_heads[hs.HEAD_NAME].dense
    w = linear.weight.detach().double()
    # the fresh u the copy starts from (torch draws it when spectral_norm is applied), then one iteration by hand
    torch.manual_seed(4)
    probe = torch.nn.utils.spectral_norm(copy.deepcopy(linear))
    u0 = probe.weight_u.detach().double()
    v = torch.nn.functional.normalize(w.T @ u0, dim=0, eps=1e-12)
    u = torch.nn.functional.normalize(w @ v, dim=0, eps=1e-12)
    assert hs.first_forward_sigma(linear, seed=4) == pytest.approx(float(u @ w @ v), rel=1e-5)
    assert hs.first_forward_sigma(linear, seed=4) <= hs.sigma(linear.weight) * (1 + 1e-6)  # power iteration: below
    assert hs.sigma(linear.weight) == pytest.approx(float(torch.linalg.svdvals(w)[0]))
    assert not hasattr(linear, "weight_orig")  # the model's layer is untouched


def test_head_scale_fresh_head_sigmas_are_fairseqs_default_init_at_random_matrix_theory_scale():
    """nn.Linear's default init draws U(-1/sqrt(n), 1/sqrt(n)), std 1/sqrt(3n): the largest singular value of a
    k x n such matrix is about (sqrt(n) + sqrt(k)) / sqrt(3n), i.e. 2/sqrt(3) = 1.155 for a square one."""
    hs = _script("head_scale")
    sigmas = hs.fresh_head_sigmas(256, 256, 2, seeds=(1, 2))
    assert len(sigmas["dense"]) == len(sigmas["out_proj"]) == 2 and sigmas["dense"][0] != sigmas["dense"][1]
    for value in sigmas["dense"]:
        assert value == pytest.approx(2 / math.sqrt(3), rel=0.05)
    for value in sigmas["out_proj"]:
        assert value == pytest.approx((16 + math.sqrt(2)) / math.sqrt(3 * 256), rel=0.1)
