"""R-Drop (baselines_src/rdrop.py) against independent computations: the sentence-prediction loss by hand
(numpy CE and symmetric KL over two passes with the same dropout draws), regression, eval = one plain pass,
the refusal of a run whose passes cannot differ, and the seq2seq loss against fairseq's own
`label_smoothed_cross_entropy_with_rdrop` on the same two outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.criterions.label_smoothed_cross_entropy_with_rdrop import RdropLabelSmoothedCrossEntropyCriterion
from fairseq.modules import FairseqDropout
from torch.nn.utils import parametrize

import baselines_src  # noqa: F401  (registers the criterions)
from baselines_src.rdrop import SentencePredictionRDropConfig, SentencePredictionRDropCriterion
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_distributed import make_sp_data, make_t2t_data, method_argv
from tests.test_r3f import HEAD, NO_DROPOUT, build, hand_symmetric_kl, reg_data  # noqa: F401  (reg_data: a fixture)

ALPHA = 0.8


@pytest.fixture(scope="module")
def cls_data(sp_data):
    return sp_data


def rdrop_argv(data, tmp_path, *extra, num_classes=2):
    return sentence_prediction_args(
        data, tmp_path / "unused", *extra, criterion="sentence_prediction_rdrop", num_classes=num_classes
    )


@pytest.fixture(scope="module")
def cls(cls_data, tmp_path_factory):
    """Task, tiny RoBERTa (dropout 0.1), R-Drop criterion and a batch, built once for this file."""
    return build(rdrop_argv(cls_data, tmp_path_factory.mktemp("rdrop"), "--rdrop-alpha", ALPHA))


def two_passes(model, sample, seed):
    """The two training passes, drawn like the criterion draws them (same seed, same order)."""
    torch.manual_seed(seed)
    first, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    second, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    return first.detach().double().numpy(), second.detach().double().numpy()


def hand_ce(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -log_p[np.arange(len(targets)), targets]


def test_classification_loss_equals_hand_computation(cls):
    _, model, criterion, sample = cls
    model.train()
    torch.manual_seed(5)
    loss, sample_size, log = criterion(model, sample)
    first, second = two_passes(model, sample, seed=5)
    targets = sample["target"].view(-1).numpy()

    kl = hand_symmetric_kl(torch.from_numpy(first), torch.from_numpy(second))
    expected = hand_ce(first, targets).sum() + hand_ce(second, targets).sum() + ALPHA / 2 * kl.sum()
    assert kl.sum() > 1e-6  # dropout made the passes differ
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert log["rdrop_kl"].item() == pytest.approx(kl.sum(), rel=1e-4)
    assert sample_size == len(targets) and log["ncorrect"] == (first.argmax(-1) == targets).sum()


def test_regression_uses_the_squared_difference(reg_data, tmp_path):  # noqa: F811  (the fixture)
    _, model, criterion, sample = build(
        rdrop_argv(reg_data, tmp_path, "--rdrop-alpha", ALPHA, "--regression-target", num_classes=1)
    )
    model.train()
    torch.manual_seed(6)
    loss, _, log = criterion(model, sample)
    first, second = (x.reshape(-1) for x in two_passes(model, sample, seed=6))
    y = sample["target"].view(-1).double().numpy()
    expected = ((first - y) ** 2).sum() + ((second - y) ** 2).sum() + ALPHA * ((first - second) ** 2).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert log["rdrop_kl"].item() == pytest.approx(2 * ((first - second) ** 2).sum(), rel=1e-4)


def test_eval_is_one_plain_pass(cls):
    _, model, criterion, sample = cls
    model.eval()
    loss, _, log = criterion(model, sample)
    logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    ce = F.cross_entropy(logits.double(), sample["target"].view(-1), reduction="sum")
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6) and "rdrop_kl" not in log


def test_passes_that_cannot_differ_are_refused(cls):
    task, model, _, sample = cls
    dropouts = [m for m in model.modules() if isinstance(m, (FairseqDropout, torch.nn.Dropout)) and m.p > 0]
    assert dropouts
    for m in dropouts:
        m.p = 0.0
    try:
        model.train()
        with pytest.raises(ValueError, match="--rdrop-alpha: .*no active dropout"):
            SentencePredictionRDropCriterion(SentencePredictionRDropConfig(), task)(model, sample)
        # another noise source is enough: HyPe's noise differs between the passes
        criterion = SentencePredictionRDropCriterion(SentencePredictionRDropConfig(hype_type="normal"), task)
        _, _, log = criterion(model, sample)
        assert log["rdrop_kl"].item() > 0 and log["hype_noise_effective_den"] > 0
    finally:
        for m in dropouts:
            m.p = 0.1


def test_mixout_makes_the_passes_differ(cls_data, tmp_path):
    """Mixout with dropout off: each pass draws its own column mask, so the passes differ once W != U."""
    _, model, criterion, sample = build(rdrop_argv(cls_data, tmp_path, *NO_DROPOUT, "--mixout-p", "0.5"))
    mixed = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert len(mixed) == 12  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    with torch.no_grad():
        for m in mixed:  # as if training had moved W away from the pretrained U
            m.parametrizations.weight.original.add_(0.05 * torch.randn_like(m.weight))
    model.train()
    _, _, log = criterion(model, sample)
    assert log["rdrop_kl"].item() > 1e-6


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_bad_alpha_names_the_flag(cls, value):
    with pytest.raises(ValueError, match="--rdrop-alpha"):
        SentencePredictionRDropCriterion(SentencePredictionRDropConfig(rdrop_alpha=value), cls[0])


def test_seq2seq_loss_equals_fairseqs_own_rdrop_criterion(tmp_path):
    """fairseq ships R-Drop for translation (2B batch in one forward); on the same two outputs its loss
    is ours: LS-CE of both + alpha/2 * symmetric KL over non-pad target tokens (tiny hyperdecoder BART)."""
    argv = method_argv("hyperdecoder_rdrop", make_sp_data(tmp_path), make_t2t_data(tmp_path), tmp_path, 1)
    task, model, criterion, sample = build([*argv, "--rdrop-alpha", str(ALPHA)])
    model.train()
    torch.manual_seed(3)
    loss, sample_size, log = criterion(model, sample)
    torch.manual_seed(3)
    out1, out2 = model(**sample["net_input"]), model(**sample["net_input"])
    stock = RdropLabelSmoothedCrossEntropyCriterion(task, False, 0.1, rdrop_alpha=ALPHA)
    both = (torch.cat([out1[0], out2[0]]), out1[1])  # the output of its 2B forward
    expected, nll, kl = stock.compute_loss(model, both, sample)
    assert kl.item() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sample_size == sample["ntokens"]
    assert log["rdrop_kl"].item() == pytest.approx(2 * kl.item(), rel=1e-4)  # fairseq logs KL_S / 2
    assert log["nll_loss"].item() == pytest.approx(nll.item() / 2, rel=1e-5)  # ours: per pass
    model.eval()  # eval: one pass, fairseq's label_smoothed_cross_entropy
    ours, _, log = criterion(model, sample)
    assert "rdrop_kl" not in log
    assert ours.item() == LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)[0].item()
