"""SMART (`sentence_prediction_smart`) and FreeLB (`--task sentence_prediction_freelb`) against independent
computations on the tiny RoBERTa, in-process and without dropout: the perturbed passes are recomputed through
fairseq's own `extract_features(token_embeddings=E + delta)` (no hooks), the ascent steps and losses by hand as
the authors' code writes them (mt-dnn `SymKlCriterion` with F.kl_div; FreeLB's fairseq `freelb_train_step`)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from baselines_src.freelb import ascent_step as freelb_step
from baselines_src.freelb import initial_delta
from baselines_src.smart import INNER_LOSS_SCALE
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_r3f import HEAD, NO_DROPOUT, build, hand_symmetric_kl

SMART = ["--criterion", "sentence_prediction_smart"]
FREELB = ["--task", "sentence_prediction_freelb", "--criterion", "hype_sentence_prediction", "--hype-type", "none"]


def logits_at(model, sample, delta):
    """f(E + delta): fairseq's token_embeddings path, which the criterions' hook must reproduce."""
    src = sample["net_input"]["src_tokens"]
    embeddings = model.encoder.sentence_encoder.embed_tokens(src)
    features, _ = model.encoder.extract_features(src, token_embeddings=embeddings + delta)
    return model.classification_heads[HEAD](features)


def keep_mask(model, sample):
    src = sample["net_input"]["src_tokens"]
    return src.ne(model.encoder.sentence_encoder.padding_idx).unsqueeze(-1).float()


def grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def assert_grads_close(a, b):
    """Equal up to rounding: the summation order differs (E + delta + positions vs E + positions + delta), so
    the tolerance is relative to the largest gradient entry (some tensors' true gradient is ~0)."""
    scale = max(float(y.abs().max()) for y in b if y is not None)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5 * scale)


# -- SMART ---------------------------------------------------------------------------------------------
def hand_smart(model, sample, sigma, eta, eps, norm, lam, seed):
    """Task loss + lambda * R_s of one step, computed directly (mt-dnn's loss, the paper's projected step)."""
    clean = logits_at(model, sample, 0.0)
    keep = keep_mask(model, sample)
    torch.manual_seed(seed)  # dropout 0: the random start is the criterion's first draw after the clean pass
    dim = model.encoder.sentence_encoder.embed_tokens.embedding_dim
    delta = (torch.randn((*keep.shape[:2], dim)) * sigma * keep).requires_grad_()
    adv = logits_at(model, sample, delta)
    p, q = F.softmax(clean.detach(), -1), F.log_softmax(adv, -1)
    inner = (p * (p.log() - q)).sum() + (q.exp() * (q - p.log())).sum()  # symmetric KL, clean side constant
    (g,) = torch.autograd.grad(inner, delta)
    if norm == "linf":
        size = g.abs().amax(-1, keepdim=True)
        step = torch.where(size > 0, g / size, torch.zeros_like(g))
        delta = (delta.detach() + eta * step).clamp(-eps, eps) * keep
    else:
        size = g.norm(dim=-1, keepdim=True)
        delta = delta.detach() + eta * torch.where(size > 0, g / size, torch.zeros_like(g))
        length = delta.norm(dim=-1, keepdim=True)
        delta = torch.where(length > eps, delta * eps / length, delta) * keep
    adv = logits_at(model, sample, delta)
    # mt_dnn/loss.py SymKlCriterion (sum instead of batchmean: per sentence like the task loss)
    reg = F.kl_div(F.log_softmax(clean, -1), F.softmax(adv.detach(), -1), reduction="sum") + F.kl_div(
        F.log_softmax(adv, -1), F.softmax(clean.detach(), -1), reduction="sum"
    )
    ce = F.cross_entropy(clean, sample["target"].view(-1), reduction="sum")
    return ce + lam * reg, reg, clean, adv, delta


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_smart_loss_and_gradient_equal_hand_computed_step(sp_data, tmp_path, norm):
    sigma, eta, eps, lam = 1e-2, 0.5, 0.05, 2.0
    flags = [*SMART, "--smart-noise-std", sigma, "--smart-step-size", eta, "--smart-eps", eps]
    flags += ["--smart-norm", norm, "--smart-lambda", lam, "--smart-mu", "0", *NO_DROPOUT]
    _, model, criterion, sample = build(sentence_prediction_args(sp_data, tmp_path, *flags))
    model.train()
    torch.manual_seed(7)
    loss, sample_size, log = criterion(model, sample)
    expected, reg, clean, adv, delta = hand_smart(model, sample, sigma, eta, eps, norm, lam, seed=7)

    assert reg.item() > 1e-6 and delta.abs().max() <= eps + 1e-9
    assert log["smart_adv"].item() == pytest.approx(hand_symmetric_kl(clean, adv).sum(), rel=1e-4)
    assert log["smart_adv"].item() == pytest.approx(reg.item(), rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["smart_skipped_num"] == 0 and sample_size == sample["target"].numel()
    assert_grads_close(grads(loss, model), grads(expected, model))


def test_smart_ascent_beats_the_random_start(sp_data, tmp_path):
    """The step is an ascent: R_s at the projected delta exceeds R_s at delta_0 of the same size."""
    _, model, criterion, sample = build(
        sentence_prediction_args(sp_data, tmp_path, *SMART, "--smart-mu", "0", "--smart-eps", "0.05", *NO_DROPOUT)
    )
    model.train()
    *_, delta = hand_smart(model, sample, 1e-2, 0.5, 0.05, "linf", 1.0, seed=3)
    clean = logits_at(model, sample, 0.0)
    torch.manual_seed(11)
    random = (torch.rand_like(delta) * 2 - 1).sign() * 0.05 * keep_mask(model, sample)  # a corner of the box
    adversarial = hand_symmetric_kl(clean, logits_at(model, sample, delta)).sum()
    assert adversarial > 3 * hand_symmetric_kl(clean, logits_at(model, sample, random)).sum()


def test_inner_loss_scale_is_exact():
    assert INNER_LOSS_SCALE == 2.0 ** round(torch.log2(torch.tensor(INNER_LOSS_SCALE)).item())


def test_smart_bregman_teacher_is_the_momentum_average(sp_data, tmp_path):
    beta, late = 0.9, 0.5
    flags = [*SMART, "--smart-mu", "0.5", "--smart-beta", beta, "--smart-beta-late", late, "--smart-lambda", "0"]
    _, model, criterion, sample = build(sentence_prediction_args(sp_data, tmp_path, *flags, *NO_DROPOUT, max_update=20))
    assert criterion.switch_update == 2  # the first 10% of --max-update 20
    model.train()
    criterion(model, sample)  # the first training forward: teacher = the starting weights
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = []
    for update in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        criterion.robustft_after_update(model, update)
        moved.append({n: p.detach().clone() for n, p in model.named_parameters()})
    b = [beta, beta, late]  # updates 1, 2 within the first 10%, then the late momentum
    for name, theta0 in start.items():
        expected = theta0
        for k in range(3):
            expected = b[k] * expected + (1 - b[k]) * moved[k][name]
        torch.testing.assert_close(criterion.teacher[name], expected, rtol=1e-6, atol=1e-7)

    # the Bregman term: l_s(student, teacher) with the teacher predicting in eval mode, weights substituted
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # by parameter (RoBERTa's lm_head.weight is embed_tokens.weight: one parameter)
        for name, p in teacher.named_parameters():
            p.copy_(criterion.teacher[name])
    teacher.eval()
    loss, _, log = criterion(model, sample)
    student = logits_at(model, sample, 0.0)
    expected = hand_symmetric_kl(student, logits_at(teacher, sample, 0.0)).sum()
    assert expected > 1e-6 and log["smart_bregman"].item() == pytest.approx(expected, rel=1e-4)
    ce = F.cross_entropy(student.double(), sample["target"].view(-1), reduction="sum").item()
    assert loss.item() == pytest.approx(ce + 0.5 * expected, rel=1e-5)
    assert model.training and all(m.training for m in model.modules())  # eval only for the teacher pass


def test_smart_refuses_bad_flags(sp_data, tmp_path):
    with pytest.raises(ValueError, match="--smart-beta-switch: 0.1 is a share of --max-update"):
        build(sentence_prediction_args(sp_data, tmp_path, *SMART, max_update=0))
    build(sentence_prediction_args(sp_data, tmp_path, *SMART, "--smart-mu", "0", max_update=0))  # no teacher
    with pytest.raises(ValueError, match="--smart-steps: must be an integer >= 1"):
        build(sentence_prediction_args(sp_data, tmp_path, *SMART, "--smart-steps", "0"))
    with pytest.raises(ValueError, match="--smart-eps: must be a finite number > 0"):
        build(sentence_prediction_args(sp_data, tmp_path, *SMART, "--smart-eps", "0"))


# -- FreeLB --------------------------------------------------------------------------------------------
def freelb_setup(sp_data, tmp_path, *flags):
    """Task, model, criterion, one batch and fairseq's adam for `task.train_step` (built from one parse)."""
    from fairseq import optim, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = sentence_prediction_args(sp_data, tmp_path, *FREELB, *NO_DROPOUT, *flags)
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
    )
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(16)])
    optimizer = optim.build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    return task, model, criterion, sample, optimizer


def hand_freelb(model, sample, steps, adv_lr, init_mag, max_norm, seed):
    """Parameter gradients of sum_t L(x + delta_t) / (K + 1) and the last delta, as freelb_train_step
    (fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py L78-184), with the per-sentence l2 rule written out."""
    keep = keep_mask(model, sample)
    lengths, dim = keep.sum(dim=(1, 2)), model.encoder.sentence_encoder.embed_tokens.embedding_dim
    torch.manual_seed(seed)
    delta = (torch.rand((*keep.shape[:2], dim)) * 2 - 1) * keep * (init_mag / (lengths * dim).sqrt()).view(-1, 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for t in range(steps + 1):
        delta.requires_grad_()
        logits = logits_at(model, sample, delta)
        loss = F.cross_entropy(logits, sample["target"].view(-1), reduction="sum") / (steps + 1)
        *g_params, g_delta = torch.autograd.grad(loss, [*params, delta], allow_unused=True)
        total = [a if b is None else a + b for a, b in zip(total, g_params)]
        if t == steps:
            break
        denom = torch.stack([g.norm() for g in g_delta]).clamp_min(1e-10).view(-1, 1, 1)
        delta = delta.detach() + adv_lr * g_delta / denom
        sizes = torch.stack([d.norm() for d in delta]).view(-1, 1, 1)
        delta = torch.where(sizes > max_norm, delta * max_norm / sizes, delta)
    return total, delta.detach()


@pytest.mark.parametrize("steps", [1, 3])
def test_freelb_gradient_equals_hand_computed_passes(sp_data, tmp_path, steps):
    adv_lr, init_mag, max_norm = 0.3, 0.5, 0.4
    flags = ["--freelb-steps", steps, "--freelb-adv-lr", adv_lr, "--freelb-init-mag", init_mag]
    task, model, criterion, sample, optimizer = freelb_setup(sp_data, tmp_path, *flags, "--freelb-max-norm", max_norm)
    model.train()
    torch.manual_seed(5)
    loss, sample_size, log = task.train_step(sample, model, criterion, optimizer, update_num=0)
    ours = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad()
    expected, delta = hand_freelb(model, sample, steps, adv_lr, init_mag, max_norm, seed=5)

    assert_grads_close(ours, expected)
    norms = delta.reshape(delta.size(0), -1).norm(dim=1)
    assert log["freelb_delta_norm_num"].item() == pytest.approx(norms.sum().item(), rel=1e-5)
    assert norms.max() <= max_norm * (1 + 1e-6)  # the bound holds after the last ascent step
    assert sample_size == sample["target"].numel()


def test_freelb_without_perturbation_is_vanilla_bit_for_bit(sp_data, tmp_path):
    """adv_lr 0 and no random start: K + 1 = 2 identical half-weighted passes = one plain pass, exactly."""
    flags = ["--freelb-steps", "1", "--freelb-adv-lr", "0", "--freelb-init-mag", "0"]
    task, model, criterion, sample, optimizer = freelb_setup(sp_data, tmp_path, *flags)
    reference = copy.deepcopy(model)
    model.train()
    task.train_step(sample, model, criterion, optimizer, update_num=0)
    reference.train()
    loss, _, _ = criterion(reference, sample)
    loss.backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_freelb_step_bounds_and_normalises_per_sentence():
    torch.manual_seed(0)
    delta, grad = torch.randn(6, 5, 8) * 0.05, torch.randn(6, 5, 8)
    grad[0] = 0  # a sentence without gradient keeps its delta (the 1e-10 floor, no NaN)
    out = freelb_step(delta, grad, adv_lr=1.0, max_norm=0.5, norm="l2")
    sizes = out.reshape(6, -1).norm(dim=1)
    assert torch.equal(out[0], delta[0]) and sizes.max() <= 0.5 * (1 + 1e-6)
    unbounded = delta + grad / grad.reshape(6, -1).norm(dim=1).clamp_min(1e-10).view(-1, 1, 1)
    inside = unbounded.reshape(6, -1).norm(dim=1) <= 0.5
    torch.testing.assert_close(out[inside], unbounded[inside])  # rescaled only where the ball is left
    torch.testing.assert_close(sizes[~inside], torch.full_like(sizes[~inside], 0.5))
    box = freelb_step(delta, grad, adv_lr=1.0, max_norm=0.05, norm="linf")
    assert box.abs().max() <= 0.05 and (box.abs() == 0.05).any()
    assert torch.equal(freelb_step(delta, grad, adv_lr=1.0, max_norm=0, norm="l2")[1:], unbounded[1:])


def test_freelb_random_start_has_the_expected_norm():
    """delta_0 = U(-1, 1) mask * mag / sqrt(L d): E||delta_0||^2 = mag^2 / 3 per sentence, pads zero."""
    keep = torch.ones(4000, 20, 1)
    keep[:, 15:] = 0
    torch.manual_seed(0)
    delta = initial_delta(keep, 32, init_mag=0.6, norm="l2")
    assert (delta[:, 15:] == 0).all()
    sq = delta.reshape(4000, -1).pow(2).sum(1)
    assert sq.mean().item() == pytest.approx(0.36 / 3, rel=0.01)
    box = initial_delta(keep, 32, init_mag=0.6, norm="linf")
    assert box.abs().max() <= 0.6 and (box[:, 15:] == 0).all()
    assert (initial_delta(keep, 32, init_mag=0, norm="l2") == 0).all()


@pytest.mark.parametrize("criterion", ["sentence_prediction_r3f", "sentence_prediction_smart"])
def test_freelb_refuses_criterions_that_perturb_the_embeddings(sp_data, tmp_path, criterion):
    flags = ["--task", "sentence_prediction_freelb", "--criterion", criterion]
    with pytest.raises(ValueError, match=f"--criterion: {criterion} with --task sentence_prediction_freelb"):
        build(sentence_prediction_args(sp_data, tmp_path, *flags))


def test_freelb_refuses_bad_flags(sp_data, tmp_path):
    with pytest.raises(ValueError, match="--freelb-steps: must be an integer >= 1"):
        build(sentence_prediction_args(sp_data, tmp_path, *FREELB, "--freelb-steps", "0"))
    with pytest.raises(ValueError, match="--freelb-max-norm: must be a finite number >= 0"):
        build(sentence_prediction_args(sp_data, tmp_path, *FREELB, "--freelb-max-norm", "-1"))
