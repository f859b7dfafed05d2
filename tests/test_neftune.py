"""NEFTune (baselines_src/neftune.py): the noise scale alpha / sqrt(L * d) (padded and per-sentence L) from its
statistics, the noisy pass against an independent computation through `extract_features(token_embeddings=)`,
no noise in eval, and bad flags naming the flag."""

import math

import pytest
import torch
import torch.nn.functional as F

import baselines_src  # noqa: F401  (registers the criterions)
from baselines_src.neftune import (
    NeftuneSettings,
    SentencePredictionNeftuneConfig,
    SentencePredictionNeftuneCriterion,
    neftune_forward,
)
from tests.fairseq_helpers import sentence_prediction_args
from tests.test_r3f import HEAD, NO_DROPOUT, build, clean_and_noisy_logits

ALPHA = 5.0


@pytest.fixture(scope="module")
def neftune(sp_data, tmp_path_factory):
    """Task, tiny RoBERTa without dropout (the noise is the only random draw), NEFTune criterion, a batch."""
    argv = sentence_prediction_args(sp_data, tmp_path_factory.mktemp("neftune"), *NO_DROPOUT, "--neftune-alpha", ALPHA)
    argv[argv.index("--criterion") + 1] = "sentence_prediction_neftune"
    return build(argv)


def drawn_noise(model, sample, settings):
    """The noise tensor NEFTune adds in one training forward (fp32, B x T x d)."""
    model.train()
    forward = lambda: model(**sample["net_input"], features_only=True, classification_head_name=HEAD)  # noqa: E731
    _, noise = neftune_forward(model, sample["net_input"]["src_tokens"], settings, forward)
    return noise.noise


def test_padded_scale_statistics(neftune):
    _, model, _, sample = neftune
    torch.manual_seed(0)
    z = drawn_noise(model, sample, NeftuneSettings(ALPHA, nonpad=False))
    batch, length, dim = z.shape
    eps = ALPHA / math.sqrt(length * dim)  # U(-1, 1) * alpha / sqrt(L d), L = padded length
    assert z.abs().max() <= eps and z.abs().max() > 0.99 * eps
    assert abs(z.mean().item()) < 4 * eps / math.sqrt(3 * z.numel())
    assert z.var().item() == pytest.approx(eps**2 / 3, rel=0.05)
    # expected squared norm per sentence: L d eps^2 / 3 = alpha^2 / 3
    assert z.pow(2).sum(dim=(1, 2)).mean().item() == pytest.approx(ALPHA**2 / 3, rel=0.05)


def test_nonpad_scale_is_per_sentence(neftune):
    _, model, _, sample = neftune
    src = sample["net_input"]["src_tokens"]
    torch.manual_seed(1)
    z = drawn_noise(model, sample, NeftuneSettings(ALPHA, nonpad=True))
    lengths = src.ne(model.encoder.sentence_encoder.padding_idx).sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch is padded: the variants differ
    for b, length in enumerate(lengths.tolist()):
        eps = ALPHA / math.sqrt(length * z.size(-1))
        assert z[b].abs().max() <= eps and z[b].abs().max() > 0.98 * eps
        # over the sentence's own tokens the squared norm is alpha^2 / 3 in expectation
        keep = src[b].ne(1)
        assert z[b][keep].pow(2).sum().item() == pytest.approx(ALPHA**2 / 3, rel=0.15)


def test_noisy_pass_equals_independent_computation(neftune):
    _, model, criterion, sample = neftune
    model.train()
    torch.manual_seed(7)
    loss, _, log = criterion(model, sample)
    eps = ALPHA / math.sqrt(sample["net_input"]["src_tokens"].size(1) * 64)
    _, noisy = clean_and_noisy_logits(model, sample, eps, seed=7)  # E + U(-eps, eps) as token_embeddings
    ce = F.cross_entropy(noisy.double(), sample["target"].view(-1), reduction="sum")
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert log["neftune_noise_effective_num"].item() == log["neftune_noise_effective_den"].item() > 0


def test_eval_has_no_noise(neftune):
    _, model, criterion, sample = neftune
    model.eval()
    loss, _, log = criterion(model, sample)
    logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    assert loss.item() == F.cross_entropy(logits.float(), sample["target"].view(-1), reduction="sum").item()
    assert not any(k.startswith("neftune") for k in log)
    layer_norm = model.encoder.sentence_encoder.layernorm_embedding
    assert not layer_norm._forward_hooks and not model.encoder.sentence_encoder.embed_tokens._forward_hooks


@pytest.mark.parametrize(
    "changes,flag",
    [
        ({"neftune_alpha": -1.0}, "--neftune-alpha"),
        ({"neftune_alpha": float("inf")}, "--neftune-alpha"),
        ({"neftune_alpha": 0.0, "neftune_length": "nonpad"}, "--neftune-alpha"),
        ({"neftune_length": "tokens"}, "--neftune-length"),
    ],
)
def test_bad_flags_name_the_flag(neftune, changes, flag):
    with pytest.raises(ValueError, match=flag):
        SentencePredictionNeftuneCriterion(SentencePredictionNeftuneConfig(**changes), neftune[0])
