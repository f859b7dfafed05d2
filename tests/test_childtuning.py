"""ChildTuning-F / -D (`*_childtuning` optimizers, baselines_src/childtuning.py) against independent computations:
mask statistics of F, numpy's percentile and a hand-checkable child selection for D, the Fisher information
against the reference's own loop (ChildTuningD.py L73-86: backward, per-tensor clip_grad_norm_, grad^2 / N),
and a D run in-process: the child network is the top-p share, everything outside it never moves, and the
mask survives the optimizer state without a second Fisher pass."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines_src.childtuning import (
    MASK_CHUNK,
    MASK_RESOLUTION,
    ChildTuning,
    ChildTuningConfig,
    bernoulli_scale_,
    fisher_information,
    fisher_loss,
    percentile,
    select_child,
)
from robustft_common import param_filters
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_r3f import NO_DROPOUT

ENCODER_LAYERS = param_filters.ENCODER_LAYERS


def config(mode, p=0.3, **kw):
    return ChildTuningConfig(childtuning_mode=mode, childtuning_reserve_p=p, seed=3, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- F -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_bernoulli_mask_statistics(p):
    n = 3 * MASK_CHUNK + 12345  # several chunks and a ragged end
    mask = bernoulli_scale_(torch.ones(n), p, gen(0), 1.0)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    p_eff = round(p * MASK_RESOLUTION) / MASK_RESOLUTION  # 16-bit uniforms
    assert abs(p_eff - p) <= 0.5 / MASK_RESOLUTION
    assert abs(mask.mean().item() - p_eff) < 5 * (p_eff * (1 - p_eff) / n) ** 0.5
    # no structure: each of the four 16-bit lanes of a draw, and the last chunk, keep the same share
    for part in (mask[::4], mask[1::4], mask[3::4], mask[-12345:]):
        assert abs(part.mean().item() - p_eff) < 5 * (p_eff * (1 - p_eff) / part.numel()) ** 0.5
    assert torch.equal(mask, bernoulli_scale_(torch.ones(n), p, gen(0), 1.0))
    assert not torch.equal(mask, bernoulli_scale_(torch.ones(n), p, gen(1), 1.0))
    # independent draws: the share kept in both of two masks is p^2
    both = (mask * bernoulli_scale_(torch.ones(n), p, gen(1), 1.0)).mean().item()
    assert abs(both - p_eff**2) < 5 * (p_eff**2 * (1 - p_eff**2) / n) ** 0.5


def _tensors(names, shapes, seed=0):
    torch.manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        params.append(p)
    return params


def test_f_masks_every_gradient_entry_with_bernoulli_over_p():
    names = ["encoder.sentence_encoder.layers.0.fc1.weight", "encoder.sentence_encoder.embed_tokens.weight", "head.b"]
    params = _tensors(names, [(300, 200), (500, 100), (7,)])
    before = [p.grad.clone() for p in params]
    child = ChildTuning(config("F", 0.3), params, names, trainer=None)
    child.apply()
    kept = total = 0
    for p, g in zip(params, before):
        nonzero = p.grad != 0
        torch.testing.assert_close(p.grad[nonzero], g[nonzero] / 0.3, rtol=2.5e-7, atol=0)  # g * (1/p): 1 ulp
        kept, total = kept + int(nonzero.sum()), total + g.numel()
    assert abs(kept / total - 0.3) < 5 * (0.21 / total) ** 0.5
    first = [p.grad != 0 for p in params]

    for p, g in zip(params, before):  # the next update draws another mask
        p.grad = g.clone()
    child.apply()
    assert not torch.equal(first[0], params[0].grad != 0)
    # same seed and update count: the same masks (identical on every rank, and after a resume)
    replay = _tensors(names, [(300, 200), (500, 100), (7,)])
    again = ChildTuning(config("F", 0.3), replay, names, trainer=None)
    again.load_state_dict({"mode": "F", "updates": 1, "masks": None})
    again.apply()
    assert torch.equal(replay[0].grad != 0, params[0].grad != 0) and child.state_dict()["updates"] == 2


def test_f_leaves_excluded_tensors_alone():
    names = ["encoder.layers.0.fc1.weight", "encoder.layers.0.fc1.bias"]
    params = _tensors(names, [(50, 40), (50,)])
    bias = params[1].grad.clone()
    ChildTuning(config("F", 0.5, childtuning_param_exclude=r"\.bias$"), params, names, trainer=None).apply()
    assert torch.equal(params[1].grad, bias) and (params[0].grad == 0).any()


# -- D: selection ------------------------------------------------------------------------------------------
def test_percentile_is_numpys():
    torch.manual_seed(0)
    values = torch.randn(10_001).abs()
    values[::7] = 0.0  # ties, as unused parameters give
    for q in (0.0, 10.0, 33.3, 70.0, 99.9, 100.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-6, abs=1e-12)


def test_child_is_the_top_share_of_a_hand_checkable_fisher():
    fisher = [torch.tensor([[0.1, 0.4], [0.3, 0.2]]), torch.tensor([0.5])]
    # reserve 0.4 of 5 entries: the 60th percentile of (0.1 .. 0.5) is 0.3 + 0.4 * (0.4 - 0.3) = 0.34
    masks, polar = select_child(fisher, 0.4)
    assert polar == pytest.approx(0.34)
    assert masks[0].tolist() == [[False, True], [False, False]] and masks[1].tolist() == [True]
    masks, _ = select_child(fisher, 1.0)
    assert all(m.all() for m in masks)  # reserve 1: everything


def test_bad_flags_name_the_flag():
    params = _tensors(["a.weight"], [(3,)])
    with pytest.raises(ValueError, match=r"--childtuning-reserve-p: must be in \(0, 1\]"):
        ChildTuning(config("F", 0.0), params, ["a.weight"], trainer=None)
    with pytest.raises(ValueError, match="--childtuning-param-include.*--fp16-no-flatten-grads"):
        ChildTuning(config("D"), params, None, trainer=None)  # one flat fp16 buffer: no names to select by
    ChildTuning(config("F"), params, None, trainer=None)  # F on every entry needs no names
    child = ChildTuning(config("D", childtuning_param_include="a"), params, ["a.weight"], trainer=None)
    with pytest.raises(ValueError, match="--childtuning-mode: D needs the fairseq Trainer"):
        child.apply()


# -- D: Fisher information and a run, in-process -------------------------------------------------------------
def _trainer(sp_data, tmp_path, *flags):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = sentence_prediction_args(sp_data, tmp_path, *NO_DROPOUT, *flags)
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
    )
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    epoch_itr = trainer.get_train_iterator(epoch=1)
    return trainer, list(epoch_itr.next_epoch_itr(shuffle=False))


@pytest.mark.e2e
def test_fisher_equals_the_reference_loop(sp_data, tmp_path):
    trainer, batches = _trainer(sp_data, tmp_path, "--criterion", "sentence_prediction_r3f", "--eps", "0.1")
    model, clip = trainer.get_model(), 0.05
    names = [n for n, _ in model.named_parameters() if "layers.1." in n]
    ours, n = fisher_information(trainer, names, clip, seed=1, batches=batches[:3])

    named = dict(model.named_parameters())
    expected = {name: torch.zeros_like(named[name]) for name in names}
    clipped = 0
    for sample in batches[:3]:  # ChildTuningD.py L73-86, with the plain task loss (no R3F term)
        model.zero_grad()
        logits, _ = model(
            **sample["net_input"], features_only=True, classification_head_name="sentence_classification_head"
        )
        F.cross_entropy(logits, sample["target"].view(-1)).backward()
        for name in names:
            clipped += int(named[name].grad.norm() > clip)
            torch.nn.utils.clip_grad_norm_(named[name], clip)
            expected[name] += named[name].grad ** 2 / 3
    assert n == 3 and clipped > 0
    for name, value in zip(names, ours):
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-12)
    r3f = trainer.get_criterion()
    loss = fisher_loss(r3f, model, batches[0])
    logits, _ = model(
        **batches[0]["net_input"], features_only=True, classification_head_name="sentence_classification_head"
    )
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batches[0]["target"].view(-1)).item(), rel=1e-6)


@pytest.mark.e2e
def test_d_trains_the_child_only_and_keeps_its_mask_in_the_optimizer_state(sp_data, tmp_path):
    flags = ["--optimizer", "adam_childtuning", "--childtuning-mode", "D", "--childtuning-reserve-p", "0.2"]
    trainer, batches = _trainer(sp_data, tmp_path, *flags, "--weight-decay", "0")
    model = trainer.get_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for sample in batches[:3]:
        trainer.train_step([sample])
    child = trainer.optimizer.childtuning
    names = child.names
    masks = {names[i]: m for i, m in enumerate(child.masks) if m is not None}
    assert set(masks) == {n for n in names if re.search(ENCODER_LAYERS, n)}  # the encoder layers (D's default)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.2) < 0.01 and child.summary["kept"] == kept
    for name, p in model.named_parameters():
        if name in masks:  # outside the child: zero gradient, zero Adam moments, no weight decay: unchanged
            assert torch.equal(p[~masks[name]], start[name][~masks[name]]), name
            if masks[name].any():  # one global threshold: some tensors have no child entries at all
                assert not torch.equal(p[masks[name]], start[name][masks[name]]), name
    assert not torch.equal(
        model.classification_heads["sentence_classification_head"].dense.weight,
        start["classification_heads.sentence_classification_head.dense.weight"],
    )

    # the checkpointed optimizer state carries the mask: a fresh optimizer takes it, no Fisher pass
    state = trainer.optimizer.state_dict()
    other, _ = _trainer(sp_data, tmp_path, *flags, "--weight-decay", "0")
    other.optimizer.load_state_dict(state)
    restored = other.optimizer.childtuning
    restored._trainer = None  # a Fisher pass would now fail
    assert all(torch.equal(a, b) for a, b in zip(restored.masks, child.masks) if a is not None)
    other.train_step([batches[3]])
    assert restored.summary == child.summary and restored.updates == 4
