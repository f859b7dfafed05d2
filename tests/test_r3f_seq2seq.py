"""R3F for encoder-decoder models (rxf_src/label_smoothed_cross_entropy_r3f.py) on a tiny BART and a tiny
transformer: token-level KL with target pads masked, both normalisations, encoder-only noise, e2e + resume;
a two-pass encoder (hyperdecoder, generated encoder adapters) gets the same noise in both passes."""

import random

import numpy as np
import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

import rxf_src  # noqa: F401
from rxf_src.embedding_noise import EncoderEmbeddingNoise, noised_forward
from tests.fairseq_helpers import REPO, TINY_ENCODER_DECODER, json_logs, run_tool, tiny_run_flags
from tests.test_r3f import build, hand_symmetric_kl

# fairseq-train runs / training in-process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

TINY = [*TINY_ENCODER_DECODER, "--share-all-embeddings"]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    """Toy translation: the target is the source reversed with every word renamed (w7 -> v7)."""
    root = tmp_path_factory.mktemp("r3f_mt")
    rng = random.Random(0)
    for split, n in (("train", 64), ("valid", 16)):
        src, tgt = [], []
        for _ in range(n):
            words = [rng.randrange(30) for _ in range(rng.randint(3, 9))]
            src.append(" ".join(f"w{i}" for i in words))
            tgt.append(" ".join(f"v{i}" for i in reversed(words)))
        (root / f"{split}.src").write_text("\n".join(src) + "\n")
        (root / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
    out = root / "bin"
    run_tool(
        "fairseq-preprocess",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--trainpref",
        root / "train",
        "--validpref",
        root / "valid",
        "--joined-dictionary",
        "--destdir",
        out,
        "--workers",
        "1",
    )
    return out


def mt_args(data, save_dir, arch, *extra, max_update=4):
    return [
        data,
        "--cpu",
        "--user-dir",
        REPO / "robustft",
        "--task",
        "translation",
        "--arch",
        arch,
        *TINY,
        "--criterion",
        "label_smoothed_cross_entropy_r3f",
        "--label-smoothing",
        "0.1",
        *tiny_run_flags(save_dir, max_update),
        *extra,
    ]


@pytest.mark.parametrize("kl_norm", ["token", "sentence"])
def test_token_level_kl_masks_pads_and_is_normalised_like_ce(mt_data, tmp_path, kl_norm):
    eps, lam = 0.05, 0.3
    _, model, criterion, sample = build(
        mt_args(
            mt_data,
            tmp_path,
            "bart_base",
            *NO_DROPOUT,
            "--eps",
            eps,
            "--r3f-lambda",
            lam,
            "--noise-type",
            "uniform",
            "--r3f-kl-norm",
            kl_norm,
        )
    )
    model.train()
    torch.manual_seed(11)
    loss, sample_size, log = criterion(model, sample)

    # independent: BART's forward honours token_embeddings (noise before embed_scale, as the paper says)
    net_input = sample["net_input"]
    clean, _ = model(**net_input)
    embeddings = model.encoder.embed_tokens(net_input["src_tokens"])
    torch.manual_seed(11)
    noise = torch.empty(embeddings.shape).uniform_(-eps, eps)
    assert model.encoder.embed_scale in (None, 1.0)
    noisy, _ = model(**net_input, token_embeddings=embeddings + noise)
    target = sample["target"]
    keep = target.ne(model.encoder.padding_idx).numpy()
    assert not keep.all()  # the batch has target pads to mask
    kl = hand_symmetric_kl(clean, noisy)[keep].sum()
    lprobs = torch.log_softmax(clean.double(), -1).view(-1, clean.size(-1))
    ls, _ = label_smoothed_nll_loss(lprobs, target.view(-1), 0.1, ignore_index=model.encoder.padding_idx)
    scale = 1.0 if kl_norm == "token" else sample_size / target.size(0)

    assert sample_size == sample["ntokens"] == keep.sum()
    assert kl > 0 and log["symm_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(ls.item() + lam * scale * kl, rel=1e-5)


def test_transformer_with_shared_embeddings_noises_encoder_only(mt_data, tmp_path):
    """No layernorm_embedding: noise goes on the lookup; the shared table must leave decoder inputs clean."""
    _, model, criterion, sample = build(mt_args(mt_data, tmp_path, "transformer", *NO_DROPOUT, "--eps", "0.1"))
    assert model.encoder.embed_tokens is model.decoder.embed_tokens and model.encoder.layernorm_embedding is None
    model.train()
    seen = {"encoder": [], "decoder": []}
    handles = [
        getattr(model, side)
        .layers[0]
        .register_forward_pre_hook(lambda mod, args, side=side: seen[side].append(args[0].detach()))
        for side in seen
    ]
    _, _, log = criterion(model, sample)
    for h in handles:
        h.remove()
    assert not torch.equal(*seen["encoder"])
    assert torch.equal(*seen["decoder"])
    assert log["symm_kl"].item() > 0
    assert log["r3f_noise_effective_num"].item() == log["r3f_noise_effective_den"].item()


def test_eval_is_plain_label_smoothed_ce(mt_data, tmp_path):
    _, model, criterion, sample = build(mt_args(mt_data, tmp_path, "bart_base", "--eps", "0.1"))
    model.eval()
    with torch.no_grad():
        loss, _, log = criterion(model, sample)
        logits, _ = model(**sample["net_input"])
    lprobs = torch.log_softmax(logits.float(), -1).view(-1, logits.size(-1))
    ls, _ = label_smoothed_nll_loss(lprobs, sample["target"].view(-1), 0.1, ignore_index=model.encoder.padding_idx)
    assert "symm_kl" not in log and loss.item() == pytest.approx(ls.item(), rel=1e-6)


def test_end_to_end_bart_with_resume(mt_data, tmp_path):
    args = mt_args(mt_data, tmp_path, "bart_base", "--eps", "1e-2")
    records = json_logs(run_tool("fairseq-train", *args).stdout)
    inner = [r for r in records if "symm_kl" in r]
    assert len(inner) == 4
    assert all(float(r["symm_kl"]) > 0 and np.isfinite(float(r["loss"])) for r in inner)
    assert all(float(r["r3f_noise_effective"]) > 0.99 for r in inner)
    valid = [r for r in records if "valid_loss" in r]
    assert valid and "valid_symm_kl" not in valid[-1]

    args = mt_args(mt_data, tmp_path, "bart_base", "--eps", "1e-2", max_update=6)
    resumed = [int(r["num_updates"]) for r in json_logs(run_tool("fairseq-train", *args).stdout) if "symm_kl" in r]
    assert resumed == [5, 6]


def test_noisy_forward_fails_loudly_when_the_noise_misses_the_source_batch(mt_data, tmp_path):
    _, model, _, sample = build(mt_args(mt_data, tmp_path, "transformer", "--eps", "0.1"))
    net_input = sample["net_input"]
    src = net_input["src_tokens"]
    # lookup hook: a forward that never embeds this src_tokens tensor would be a clean "noisy" pass
    with pytest.raises(RuntimeError, match="never embedded the source tokens"):
        noised_forward(model, src, 0.1, "uniform", lambda: model(**{**net_input, "src_tokens": src.clone()}))
    # layer-norm hook: the encoder embedding another batch inside the noisy forward is refused
    _, bart, _, _ = build(mt_args(mt_data, tmp_path, "bart_base", "--eps", "0.1"))
    with pytest.raises(RuntimeError, match="one source batch per forward"):
        noised_forward(bart, src, 0.1, "uniform", lambda: bart.encoder(src[:2]))


# -- a two-pass encoder: hyperdecoder with --encoder-adapter generated --------------------------------
def generated_encoder_run(data, tmp_path, *extra):
    """Tiny hyperdecoder whose encoder runs twice per forward (pass 1 -> adapter generator -> pass 2, which
    the decoder reads); dropout 0, so the noise is the only difference between the criterion's passes."""
    return build(
        mt_args(data, tmp_path, "hyperdecoder_bart_tiny", "--encoder-adapter", "generated", *NO_DROPOUT, *extra)
    )


def test_one_noise_sample_reaches_both_encoder_passes(mt_data, tmp_path):
    """Pass 2's output (what the decoder reads) moves with the noise, and equals the independent
    `token_embeddings=E + z`, which HyperdecoderEncoder hands to both passes."""
    _, model, _, sample = generated_encoder_run(mt_data, tmp_path)
    model.eval()
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    outputs = []  # final encoder layer output of each pass, T x B x C
    model.encoder.layers[-1].register_forward_hook(lambda mod, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        clean = model.encoder(src, src_lengths=lengths)["encoder_out"][0]
        torch.manual_seed(3)
        with EncoderEmbeddingNoise(model, src, 0.1, "uniform") as noise:
            noisy = model.encoder(src, src_lengths=lengths)["encoder_out"][0]
        assert model.encoder.embed_scale in (None, 1.0)  # so z on the layer norm's input equals z on E
        embeddings = model.encoder.embed_tokens(src)
        torch.manual_seed(3)
        z = torch.empty(embeddings.shape).uniform_(-0.1, 0.1)
        reference = model.encoder(src, src_lengths=lengths, token_embeddings=embeddings + z)
    clean_1, clean_2, noisy_1, noisy_2 = outputs[:4]
    assert len(outputs) == 6 and torch.equal(clean_2, clean) and torch.equal(noisy_2, noisy)

    assert (noisy_2 - clean_2).abs().max() > 1e-2  # the decoder-facing pass is perturbed ...
    assert (noisy_1 - clean_1).abs().max() > 1e-2  # ... and so is the generator's input pass
    torch.testing.assert_close(noisy, reference["encoder_out"][0], rtol=1e-5, atol=1e-5)
    # counted: both passes, every non-pad entry (fp32)
    tokens = src.ne(model.encoder.padding_idx).sum().item() * clean.size(-1)
    assert noise.calls == 2 and noise.changed.item() == noise.total.item() == 2 * tokens


def test_generated_encoder_adapters_token_kl_is_positive_and_independent(mt_data, tmp_path):
    """dropout 0, eps > 0: the KL comes from the noise alone, through the pass the decoder reads."""
    eps = 0.05
    _, model, criterion, sample = generated_encoder_run(
        mt_data, tmp_path, "--eps", eps, "--r3f-lambda", 1.0, "--noise-type", "uniform"
    )
    model.train()
    torch.manual_seed(5)
    _, _, log = criterion(model, sample)

    net_input = sample["net_input"]
    clean, _ = model(**net_input)
    embeddings = model.encoder.embed_tokens(net_input["src_tokens"])
    torch.manual_seed(5)
    noise = torch.empty(embeddings.shape).uniform_(-eps, eps)
    noisy, _ = model(**net_input, token_embeddings=embeddings + noise)
    keep = sample["target"].ne(model.encoder.padding_idx).numpy()
    kl = hand_symmetric_kl(clean, noisy)[keep].sum()

    assert log["symm_kl"].item() > 0 and log["symm_kl"].item() == pytest.approx(kl, rel=1e-4)
    tokens = net_input["src_tokens"].ne(model.encoder.padding_idx).sum().item() * embeddings.size(-1)
    assert log["r3f_noise_effective_num"].item() == log["r3f_noise_effective_den"].item() == 2 * tokens


def test_end_to_end_generated_encoder_adapters(mt_data, tmp_path):
    args = mt_args(
        mt_data,
        tmp_path,
        "hyperdecoder_bart_tiny",
        "--encoder-adapter",
        "generated",
        *NO_DROPOUT,
        "--eps",
        "0.1",
        max_update=2,
    )
    inner = [r for r in json_logs(run_tool("fairseq-train", *args).stdout) if "symm_kl" in r]
    assert len(inner) == 2
    assert all(float(r["symm_kl"]) > 0 and float(r["r3f_noise_effective"]) == 1.0 for r in inner)
