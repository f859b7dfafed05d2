"""R3F for sentence prediction (rxf_src/sentence_prediction_r3f.py): the KL term against an independent
computation, noise reaching the encoder, no noise at eval, fp16 effectiveness, STS-B, end-to-end runs."""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import rxf_src  # noqa: F401  (registers the criterions)
from robustft_common.kl import symmetric_kl
from tests.fairseq_helpers import (
    TINY_ENCODER_DECODER,
    json_logs,
    sentence_prediction_args,
    train_sentence_prediction,
)

HEAD = "sentence_classification_head"
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0", "--pooler-dropout", "0"]


def build(argv, split="valid", n=16):
    """Task, model, criterion and one batch, built in-process from fairseq-train flags."""
    args = options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset(split)
    dataset = task.dataset(split)
    sample = dataset.collater([dataset[i] for i in range(n)])
    return task, model, criterion, sample


def hand_symmetric_kl(logits_p, logits_q):
    """sum_c p log(p/q) + q log(q/p) per row, float64 numpy."""
    a = logits_p.detach().double().numpy()
    b = logits_q.detach().double().numpy()
    log_p = a - a.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = b - b.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    p, q = np.exp(log_p), np.exp(log_q)
    return (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)


@pytest.fixture(scope="module")
def cls_data(sp_data):
    return sp_data  # tests/conftest.py: the shared toy classification data


@pytest.fixture(scope="module")
def reg_data(cls_data, tmp_path_factory):
    """The classification inputs with the helper's STS-B-like target (fraction of 'positive' first-sentence
    words), without re-running fairseq-preprocess on the same sentences."""
    out = tmp_path_factory.mktemp("r3f_reg") / "bin"
    for name in ("input0", "input1"):
        shutil.copytree(cls_data / name, out / name)
    (out / "label").mkdir()
    for split in ("train", "valid"):
        rows = (cls_data.parent / "raw" / f"{split}.input0").read_text().splitlines()
        targets = [sum(int(w[1:]) < 20 for w in row.split()) / len(row.split()) for row in rows]
        (out / "label" / f"{split}.label").write_text("".join(f"{t:.4f}\n" for t in targets))
    return out


def r3f_argv(data, tmp_path, *extra, num_classes=2):
    return sentence_prediction_args(
        data, tmp_path / "unused", *NO_DROPOUT, *extra, criterion="sentence_prediction_r3f", num_classes=num_classes
    )


def clean_and_noisy_logits(model, sample, eps, seed):
    """Independent of the criterion's hooks: noise added to the token embeddings and fed through
    `extract_features(token_embeddings=...)`, which (unlike RobertaEncoder.forward) honours them."""
    src = sample["net_input"]["src_tokens"]
    clean, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    embeddings = model.encoder.sentence_encoder.embed_tokens(src)
    torch.manual_seed(seed)
    noise = torch.empty(embeddings.shape).uniform_(-eps, eps)
    features, _ = model.encoder.extract_features(src, token_embeddings=embeddings + noise)
    return clean, model.classification_heads[HEAD](features)


# -- the shared KL -----------------------------------------------------------------------------------
def test_symmetric_kl_matches_hand_computation_and_masks():
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 7) * 3, torch.randn(3, 5, 7) * 3
    mask = torch.rand(3, 5) > 0.4
    out = symmetric_kl(p, q, mask)
    expected = hand_symmetric_kl(p, q)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[mask].numpy(), expected[mask.numpy()], rtol=1e-5)
    assert (out[~mask] == 0).all()
    np.testing.assert_allclose(
        symmetric_kl(p.half(), q.half()).numpy(), hand_symmetric_kl(p.half(), q.half()), rtol=1e-4
    )
    assert (symmetric_kl(p, p) == 0).all()


# -- the criterion, in-process -----------------------------------------------------------------------
def test_logged_kl_and_loss_equal_independent_computation(cls_data, tmp_path):
    eps, lam = 0.05, 0.7
    _, model, criterion, sample = build(r3f_argv(cls_data, tmp_path, "--eps", eps, "--r3f-lambda", lam))
    model.train()
    torch.manual_seed(123)  # dropout is 0: the only random draw is the noise, after the clean pass
    loss, sample_size, log = criterion(model, sample)
    clean, noisy = clean_and_noisy_logits(model, sample, eps, seed=123)

    kl = hand_symmetric_kl(clean, noisy).sum()
    targets = sample["target"].view(-1)
    ce = F.cross_entropy(clean.double(), targets, reduction="sum").item()
    assert kl > 0
    assert log["symm_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(ce + lam * kl, rel=1e-5)
    assert sample_size == len(targets)
    assert log["r3f_noise_effective_num"].item() == log["r3f_noise_effective_den"].item() > 0


def test_reference_token_embeddings_path_is_a_clean_pass(cls_data, tmp_path):
    """Why the criterion hooks the encoder: RoBERTa drops `token_embeddings` passed to model(...)."""
    _, model, _, sample = build(r3f_argv(cls_data, tmp_path))
    model.train()
    src = sample["net_input"]["src_tokens"]
    noisy_embeddings = model.encoder.sentence_encoder.embed_tokens(src) + 1.0
    clean, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    ignored, _ = model(
        **sample["net_input"], features_only=True, classification_head_name=HEAD, token_embeddings=noisy_embeddings
    )
    assert torch.equal(clean, ignored)


def test_kl_is_zero_without_noise_and_grows_with_eps(cls_data, tmp_path):
    _, model, criterion, sample = build(r3f_argv(cls_data, tmp_path))
    model.train()
    kls = []
    for eps in (0.0, 1e-3, 1e-2, 1e-1):
        criterion.eps = eps
        torch.manual_seed(5)
        _, _, log = criterion(model, sample)
        kls.append(log["symm_kl"].item())
        effective = log["r3f_noise_effective_num"].item() / log["r3f_noise_effective_den"].item()
        assert effective == (0.0 if eps == 0 else pytest.approx(1.0, abs=1e-3))
    assert kls[0] == 0.0
    assert 0 < kls[1] < kls[2] < kls[3], kls


def test_gradient_reaches_parameters_through_the_noisy_pass(cls_data, tmp_path):
    _, model, criterion, sample = build(r3f_argv(cls_data, tmp_path, "--eps", "0.1"))
    model.train()
    logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    # clean logits detached: every gradient below flows through the noisy pass only
    extra, _ = criterion.extra_terms(model, sample, logits.detach(), sample["target"].view(-1))
    extra.backward()
    encoder = model.encoder.sentence_encoder
    for param in (
        encoder.embed_tokens.weight,
        encoder.layers[0].fc1.weight,
        encoder.layernorm_embedding.weight,
        model.classification_heads[HEAD].out_proj.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0 and torch.isfinite(param.grad).all()


def test_eval_has_no_noise_and_no_leftover_hooks(cls_data, tmp_path):
    _, model, criterion, sample = build(r3f_argv(cls_data, tmp_path, "--eps", "0.1"))
    encoder = model.encoder.sentence_encoder
    model.train()
    criterion(model, sample)
    assert not encoder.layernorm_embedding._forward_hooks and not encoder.embed_tokens._forward_hooks
    model.eval()
    calls = []
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        loss, _, log = criterion(model, sample)
        logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    handle.remove()
    assert len(calls) == 2  # one encoder pass for the criterion, one for the reference above
    assert "symm_kl" not in log and "r3f_noise_effective_num" not in log
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits, sample["target"].view(-1), reduction="sum").item(), rel=1e-6
    )


def test_noise_effective_is_measured_where_the_encoder_consumes_it_fp16(cls_data, tmp_path):
    """Under fp16 a small eps is partly rounded away; the logged fraction equals the fraction of non-pad
    entries of the first layer's input that differ from the clean pass (dropout 0)."""
    _, model, criterion, sample = build(r3f_argv(cls_data, tmp_path, "--eps", "1e-5"))
    model.half().train()
    encoder = model.encoder.sentence_encoder
    inputs = []
    handle = encoder.layers[0].register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach()))
    _, _, log = criterion(model, sample)
    handle.remove()
    clean, noisy = inputs
    keep = sample["net_input"]["src_tokens"].ne(encoder.padding_idx).t().unsqueeze(-1)
    measured = ((clean != noisy) & keep).sum().item() / (keep.sum().item() * clean.size(-1))
    logged = log["r3f_noise_effective_num"].item() / log["r3f_noise_effective_den"].item()
    assert logged == pytest.approx(measured, abs=1e-9)
    assert 0 < logged < 1
    assert torch.isfinite(log["symm_kl"]) and log["symm_kl"].item() > 0


def test_regression_gaussian_kl_and_skip(reg_data, tmp_path):
    eps, lam = 0.05, 0.5
    argv = r3f_argv(reg_data, tmp_path, "--eps", eps, "--r3f-lambda", lam, "--regression-target", num_classes=1)
    _, model, criterion, sample = build(argv)
    model.train()
    torch.manual_seed(7)
    loss, _, log = criterion(model, sample)
    clean, noisy = clean_and_noisy_logits(model, sample, eps, seed=7)
    a, b = clean.view(-1).double(), noisy.view(-1).double()
    kl = (2 * (a - b) ** 2).sum().item()
    mse = ((a - sample["target"].view(-1).double()) ** 2).sum().item()
    assert kl > 0 and log["symm_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(mse + lam * kl, rel=1e-5)

    _, model, criterion, sample = build([*argv, "--r3f-regression-kl", "none"])
    model.train()
    calls = []
    handle = model.encoder.sentence_encoder.register_forward_hook(lambda *a: calls.append(1))
    _, _, log = criterion(model, sample)
    handle.remove()
    assert len(calls) == 1 and "symm_kl" not in log  # no wasted noisy pass


def test_regression_kl_none_is_never_silent(reg_data, cls_data, tmp_path, caplog):
    """On a regression task it turns R3F off: said at startup. On classification it would do nothing: refused."""
    argv = r3f_argv(reg_data, tmp_path, "--regression-target", "--r3f-regression-kl", "none", num_classes=1)
    with caplog.at_level("WARNING", logger="rxf_src.sentence_prediction_r3f"):
        build(argv)
    assert "R3F is OFF: --r3f-regression-kl none with --regression-target" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rxf_src.sentence_prediction_r3f"):
        build(r3f_argv(reg_data, tmp_path, "--regression-target", num_classes=1))  # control: the default
    assert "R3F is OFF" not in caplog.text
    with pytest.raises(ValueError, match="--r3f-regression-kl: none applies only with --regression-target"):
        build(r3f_argv(cls_data, tmp_path, "--r3f-regression-kl", "none"))


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--eps", "-1", "--eps"),
        ("--r3f-lambda", "nan", "--r3f-lambda"),
    ],
)
def test_bad_flag_values_name_the_flag(cls_data, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        build(r3f_argv(cls_data, tmp_path, flag, value))


def test_reference_flag_names_arrive(cls_data, tmp_path):
    _, _, criterion, _ = build(
        r3f_argv(
            cls_data, tmp_path, "--eps", "3e-4", "--noise-type", "normal", "--r3f-lambda", "0.25", "--adam-eps", "1e-6"
        )
    )
    assert (criterion.eps, criterion.noise_type, criterion.r3f_lambda) == (3e-4, "normal", 0.25)


# -- end to end -----------------------------------------------------------------------------------------
def train(data, save_dir, *extra, num_classes=2, max_update=4):
    proc = train_sentence_prediction(
        data,
        save_dir,
        "--eps",
        "1e-2",
        *extra,
        criterion="sentence_prediction_r3f",
        num_classes=num_classes,
        max_update=max_update,
    )
    return proc.stdout


@pytest.mark.e2e
def test_end_to_end_classification_with_resume(cls_data, tmp_path):
    out = train(cls_data, tmp_path, "--report-mcc", "--r3f-lambda", "0.7")
    records = json_logs(out)
    inner = [r for r in records if "symm_kl" in r]
    assert len(inner) == 4 and all(float(r["symm_kl"]) > 0 and float(r["r3f_noise_effective"]) > 0.99 for r in inner)
    valid = json_logs(out, "valid_")[-1]
    assert "valid_accuracy" in valid and "valid_mcc" in valid and "valid_symm_kl" not in valid
    assert (tmp_path / "checkpoint_last.pt").exists()

    resumed = train(cls_data, tmp_path, "--report-mcc", "--r3f-lambda", "0.7", max_update=6)
    updates = [int(r["num_updates"]) for r in json_logs(resumed) if "symm_kl" in r]
    assert updates == [5, 6]


@pytest.mark.e2e
def test_end_to_end_regression_and_memory_efficient_fp16(reg_data, tmp_path):
    out = train(
        reg_data,
        tmp_path,
        "--regression-target",
        "--report-pearson-and-spearman",
        "--memory-efficient-fp16",
        "--fp16-init-scale",
        "4",
        "--eps",
        "1e-5",
        num_classes=1,
    )
    inner = [r for r in json_logs(out) if "symm_kl" in r]
    assert inner and all(math.isfinite(float(r["loss"])) for r in inner)
    effective = [float(r["r3f_noise_effective"]) for r in inner]
    assert all(0 < e < 1 for e in effective), effective  # fp16: part of eps 1e-5 is rounded away
    valid = json_logs(out, "valid_")[-1]
    assert "valid_pearson" in valid and "valid_spearman" in valid


@pytest.mark.e2e
def test_end_to_end_composes_with_hype(cls_data, tmp_path):
    out = train(cls_data, tmp_path, "--hype-type", "normal", "--hype-eps", "1e-3", "--no-save")
    inner = [r for r in json_logs(out) if "symm_kl" in r]
    assert inner and all(float(r["symm_kl"]) > 0 for r in inner)
    assert all("hype_noise_effective" in r for r in inner)


# -- BART classification heads (eos pooling, encoder-decoder) ------------------------------------------
TINY_BART = ["--arch", "bart_base", *TINY_ENCODER_DECODER, "--add-prev-output-tokens"]


def bart_classification_argv(data, tmp_path, *extra):
    # later --arch flags override the helper's tiny RoBERTa
    return r3f_argv(data, tmp_path, *TINY_BART, *extra)


def test_bart_classification_head_gets_encoder_noise(cls_data, tmp_path):
    _, model, criterion, sample = build(bart_classification_argv(cls_data, tmp_path))
    assert type(model).__name__ == "BARTModel" and "prev_output_tokens" in sample["net_input"]
    model.train()
    kls = []
    for eps in (0.0, 1e-2, 1e-1):
        criterion.eps = eps
        torch.manual_seed(3)
        _, _, log = criterion(model, sample)
        kls.append(log["symm_kl"].item())
    assert kls[0] == 0.0 and 0 < kls[1] < kls[2], kls

    # the same value as noising BART's token_embeddings (which BART's forward honours)
    criterion.eps = 0.05
    torch.manual_seed(9)
    _, _, log = criterion(model, sample)
    net_input = sample["net_input"]
    clean, _ = model(**net_input, features_only=True, classification_head_name=HEAD)
    embeddings = model.encoder.embed_tokens(net_input["src_tokens"])
    torch.manual_seed(9)
    noise = torch.empty(embeddings.shape).uniform_(-0.05, 0.05)
    noisy, _ = model(
        **net_input, features_only=True, classification_head_name=HEAD, token_embeddings=embeddings + noise
    )
    assert log["symm_kl"].item() == pytest.approx(hand_symmetric_kl(clean, noisy).sum(), rel=1e-4)
