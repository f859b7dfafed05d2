"""Mixout (robustft_common/mixout.py): the mixing expectation E[W~] = W and the per-column mask, its gradient
(exact and the authors' code's), eval = W, stock state-dict keys with the target filled from a pretrained
checkpoint or restored from a Mixout one, a built fairseq RoBERTa against an independent computation of its
mixed attention projection (MultiheadAttention's fast path reads the parametrized weight), and refusals."""

import argparse
import copy
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from robustft_common.mixout import (
    MixoutSettings,
    install_from_model_args,
    install_mixout,
    mixout_settings,
    mixout_state,
    require_installed,
)
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_r3f import HEAD, NO_DROPOUT, build

P = 0.7


class Stack(nn.Module):
    """Two 'Transformer layers' of one linear each, named like fairseq's (`layers.N.`), and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(4, 4))])
        self.head = nn.Linear(4, 2)


def mixed_stack(p=P, reference_grad=False, seed=0):
    torch.manual_seed(seed)
    model = Stack()
    install_mixout(model, MixoutSettings(p, r"(^|\.)layers\.\d+\.", reference_grad))
    return model


def set_target(linear, target):
    linear.parametrizations.weight[0].target.copy_(target)


def test_only_the_layers_are_mixed_and_eval_is_w():
    model = mixed_stack()
    assert mixout_state(model).names == ["layers.0.0", "layers.1.0"]
    assert not parametrize.is_parametrized(model.head)
    model.eval()
    linear = model.layers[0][0]
    assert linear.weight is linear.parametrizations.weight.original  # eval reads W itself


def test_mixing_expectation_and_column_mask():
    model = mixed_stack()
    linear = model.layers[0][0]
    w = linear.parametrizations.weight.original.detach().clone()
    u = torch.randn_like(w)
    set_target(linear, u)
    model.train()
    draws = torch.stack([linear.weight.detach() for _ in range(4000)])
    kept_value = u + (w - u) / (1 - P)
    # every column is either reverted to U or kept, rescaled; one decision per input column
    kept = torch.isclose(draws, kept_value.expand_as(draws), atol=1e-6).all(dim=1)
    reverted = torch.isclose(draws, u.expand_as(draws), atol=1e-6).all(dim=1)
    assert (kept ^ reverted).all()
    assert kept.float().mean().item() == pytest.approx(1 - P, abs=0.02)
    # E[W~] = W: within 5 standard errors of the mean, entry by entry
    std = (w - u).abs() * (P / (1 - P)) ** 0.5
    assert ((draws.mean(0) - w).abs() / (std / len(draws) ** 0.5)).max() < 5


@pytest.mark.parametrize("reference_grad", [False, True])
def test_gradient_exact_and_reference(reference_grad):
    model = mixed_stack(reference_grad=reference_grad)
    linear = model.layers[0][0]
    u = torch.randn_like(linear.weight)
    set_target(linear, u)
    model.train()
    mixed = linear.weight
    g = torch.randn_like(mixed)
    (mixed * g).sum().backward()
    keep = ~torch.isclose(mixed.detach(), u, atol=1e-7).all(dim=0)  # the columns not reverted
    assert 0 < keep.sum() < keep.numel()
    scale = keep.float() if reference_grad else keep.float() / (1 - P)  # the code's grad * m; d W~ / d W
    torch.testing.assert_close(linear.parametrizations.weight.original.grad, g * scale)


def test_state_dict_keys_and_targets():
    model = mixed_stack()
    keys = set(model.state_dict())
    assert keys == {
        "layers.0.0.weight",
        "layers.0.0.bias",
        "layers.0.0.mixout_target",
        "layers.1.0.weight",
        "layers.1.0.bias",
        "layers.1.0.mixout_target",
        "head.weight",
        "head.bias",
    }
    # a pretrained (plain) checkpoint: the targets become its weights
    pretrained = Stack().state_dict()
    model.load_state_dict(pretrained)
    assert mixout_state(model).source == "checkpoint weights"
    for i in (0, 1):
        saved = model.state_dict()
        assert saved[f"layers.{i}.0.mixout_target"].equal(pretrained[f"layers.{i}.0.weight"])
        assert saved[f"layers.{i}.0.weight"].equal(pretrained[f"layers.{i}.0.weight"])
    # a Mixout checkpoint (resume): its targets, not its weights
    with torch.no_grad():
        model.layers[0][0].parametrizations.weight.original.add_(1.0)
    resumed = mixed_stack(seed=3)
    resumed.load_state_dict(model.state_dict())
    assert mixout_state(resumed).source == "saved targets"
    target = resumed.layers[0][0].parametrizations.weight[0].target
    assert target.equal(pretrained["layers.0.0.weight"])
    assert not target.equal(resumed.state_dict()["layers.0.0.weight"])


@pytest.fixture(scope="module")
def roberta(sp_data, tmp_path_factory):
    """A tiny fairseq RoBERTa built through `task.build_model` with --mixout-p (only layer 0's q_proj mixed,
    so one mask is drawn per forward), dropout off."""
    argv = sentence_prediction_args(
        sp_data,
        tmp_path_factory.mktemp("mixout"),
        *NO_DROPOUT,
        "--mixout-p",
        P,
        "--mixout-layers",
        r"layers\.0\.self_attn\.q_proj$",
        criterion="hype_sentence_prediction",
    )
    return build(argv)


def test_fairseq_model_mixes_what_the_attention_reads(roberta):
    _, model, criterion, sample = roberta
    q_proj = model.encoder.sentence_encoder.layers[0].self_attn.q_proj
    assert mixout_state(model).names == ["encoder.sentence_encoder.layers.0.self_attn.q_proj"]
    w = q_proj.parametrizations.weight.original.detach()
    u = w + 0.5 * torch.randn_like(w)  # as if the run had moved away from the pretrained U
    set_target(q_proj, u)
    forward = lambda m: m(**sample["net_input"], features_only=True, classification_head_name=HEAD)[0]  # noqa: E731

    model.train()
    torch.manual_seed(11)
    mixed = forward(model)
    # independent: the same Bernoulli row drawn by hand, the mixed matrix computed by hand and put into a copy
    # of the model as both W and U (so that the copy's own mask changes nothing)
    torch.manual_seed(11)
    keep = torch.empty(w.size(1)).bernoulli_(1 - P)
    by_hand = u + (w - u) * keep / (1 - P)
    fixed = copy.deepcopy(model)
    fixed_q = fixed.encoder.sentence_encoder.layers[0].self_attn.q_proj
    with torch.no_grad():
        fixed_q.parametrizations.weight.original.copy_(by_hand)
    set_target(fixed_q, by_hand)
    torch.testing.assert_close(mixed, forward(fixed))
    model.eval()
    assert not torch.allclose(mixed, forward(model))  # training really mixed
    loss, _, _ = criterion(model.train(), sample)  # the criterion sees the model carries Mixout
    assert torch.isfinite(loss)


def test_criterion_refuses_a_model_without_mixout(roberta):
    _, model, _, _ = roberta
    with pytest.raises(ValueError, match="--mixout-p"):
        require_installed(Stack(), MixoutSettings(0.9, r"layers", False))
    with pytest.raises(ValueError, match="--mixout-p: the model carries Mixout"):
        require_installed(model, MixoutSettings(0.5, r"layers", False))


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"mixout_p": 1.0}, "--mixout-p: must be in [0, 1)"),
        ({"mixout_p": -0.1}, "--mixout-p: must be in [0, 1)"),
        ({"mixout_p": float("nan")}, "--mixout-p: must be in [0, 1)"),
        ({"mixout_p": 0.5, "mixout_grad": "true"}, "--mixout-grad"),
        ({"mixout_p": 0.5, "mixout_layers": "layers.(0"}, "--mixout-layers: not a valid regular expression"),
        ({"mixout_p": 0.5, "mixout_layers": "no_such_layer"}, "--mixout-layers: 'no_such_layer' matches no nn.Linear"),
        ({"mixout_layers": "head"}, "--mixout-p: --mixout-layers set but --mixout-p is 0"),
        ({"mixout_p": 0.5, "optimizer": "adamax_pats"}, "--mixout-p: Mixout does not compose with --optimizer"),
        ({"mixout_p": 0.5, "optimizer": "adamax_sage"}, "--mixout-p: Mixout does not compose with --optimizer"),
    ],
)
def test_bad_settings_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mixout_settings(argparse.Namespace(**flags))
        install_from_model_args(Stack(), argparse.Namespace(**flags))


def test_settings_reach_the_model_under_hydra():
    """A dataclass/hydra model node sees the criterion's flags and the optimizer through its parent config."""
    run = OmegaConf.create(
        {"model": {"_name": "x"}, "criterion": {"mixout_p": 0.5, "mixout_layers": "layers\\.1\\."}, "optimizer": {}}
    )
    model = Stack()
    install_from_model_args(model, run.model)
    assert mixout_state(model).names == ["layers.1.0"] and mixout_state(model).settings.p == 0.5
    run.optimizer = {"_name": "adamax_sage"}
    with pytest.raises(ValueError, match="adamax_sage"):
        install_from_model_args(Stack(), run.model)
    install_from_model_args(plain := Stack(), argparse.Namespace())  # no flag: untouched
    assert mixout_state(plain) is None and not parametrize.is_parametrized(plain.layers[0][0])
