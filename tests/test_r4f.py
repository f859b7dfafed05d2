"""R4F (--spectral-norm-classification-head; robustft_common/spectral_norm_heads.py, installed by
fairseq_patches.py): train, save, resume, reload for inference, and the paper's variant that also normalises
the head's dense layer, under fairseq-train and under hydra."""

import shutil

import numpy as np
import pytest
import torch
from fairseq.models.roberta import RobertaModel
from omegaconf import OmegaConf

import rxf_src  # noqa: F401  (registers sentence_prediction_r3f; robustft_common installs the patches)
from robustft_common.spectral_norm_heads import (
    check_dense_normalised,
    check_init_only,
    dense_norm_requested,
    init_only_requested,
    is_spectral_normed,
)
from tests.fairseq_helpers import (
    REPO,
    TINY_ROBERTA_HYDRA,
    json_logs,
    run_hydra_train,
    sentence_prediction_args,
    train_sentence_prediction,
)
from tests.test_r3f import HEAD, build

PREFIX = f"classification_heads.{HEAD}."


@pytest.fixture(scope="module")
def data(sp_data):
    return sp_data  # tests/conftest.py: the shared toy classification data


def run_r4f(data, save_dir, *extra, max_update=4):
    return train_sentence_prediction(
        data,
        save_dir,
        "--spectral-norm-classification-head",
        "--eps",
        "1e-2",
        *extra,
        criterion="sentence_prediction_r3f",
        max_update=max_update,
    )


def train(data, save_dir, *extra, max_update=4):
    return json_logs(run_r4f(data, save_dir, *extra, max_update=max_update).stdout)


def reload_head(save_dir, data):
    """checkpoint_last.pt of `save_dir` reloaded for inference through the hub; its classification head.
    Toy words: no GPT-2 BPE (it would download)."""
    hub = RobertaModel.from_pretrained(
        str(save_dir),
        checkpoint_file="checkpoint_last.pt",
        data_name_or_path=str(data),
        user_dir=str(REPO / "robustft"),
        bpe=None,
    )
    hub.eval()
    return hub, hub.model.classification_heads[HEAD]


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def eval_normalised(state, name):
    """W / (u^T W v): the matrix torch's spectral_norm uses in eval, from the saved tensors."""
    w, u, v = (state[PREFIX + f"{name}.weight{s}"] for s in ("_orig", "_u", "_v"))
    return w / torch.dot(u, w @ v)


@pytest.mark.e2e
@pytest.mark.parametrize("dense", [False, True], ids=["out_proj", "paper_all_matrices"])
def test_train_resume_and_reload_for_inference(data, tmp_path, dense):
    extra = ["--r4f-spectral-norm-dense"] if dense else []
    first = train(data, tmp_path, *extra)
    assert [int(r["num_updates"]) for r in first if "symm_kl" in r] == [1, 2, 3, 4]
    state = load_state(tmp_path / "checkpoint_last.pt")
    normalised = [n for n in ("dense", "out_proj") if PREFIX + f"{n}.weight_orig" in state]
    assert normalised == (["dense", "out_proj"] if dense else ["out_proj"])

    resumed = train(data, tmp_path, *extra, max_update=6)  # fairseq's reference: KeyError ...out_proj.weight
    assert [int(r["num_updates"]) for r in resumed if "symm_kl" in r] == [5, 6]

    hub, head = reload_head(tmp_path, data)
    assert is_spectral_normed(head.out_proj) and is_spectral_normed(head.dense) == dense
    state = load_state(tmp_path / "checkpoint_last.pt")
    for name in normalised:
        with torch.no_grad():
            head(torch.zeros(1, 1, head.dense.in_features))  # eval forward recomputes .weight from u, v
        torch.testing.assert_close(getattr(head, name).weight, eval_normalised(state, name))
    tokens = hub.task.source_dictionary.encode_line("<s> w1 w2 w3 </s> </s> w4 w5", add_if_not_exist=False).long()
    log_probs = hub.predict(HEAD, tokens)
    assert log_probs.shape == (1, 2) and torch.isfinite(log_probs).all()
    assert torch.exp(log_probs).sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.e2e
def test_stock_upgrade_fails_and_ours_converts_normalised_heads_to_plain(data, tmp_path):
    """The defect the plugin fixes, and loading an R4F head into a plain head as the matrix it represents."""
    argv = sentence_prediction_args(
        data,
        tmp_path,
        "--spectral-norm-classification-head",
        "--r4f-spectral-norm-dense",
        criterion="sentence_prediction_r3f",
    )
    _, r4f_model, _, sample = build(argv)
    r4f_model.train()
    for _ in range(3):  # a few power iterations so u, v are not at their random init
        r4f_model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    r4f_model.eval()
    saved = {k: v.clone() for k, v in r4f_model.state_dict().items()}

    with pytest.raises(KeyError, match="out_proj.weight"):
        RobertaModel.upgrade_state_dict_named.__wrapped__(r4f_model, dict(saved), "")

    _, plain_model, _, _ = build(sentence_prediction_args(data, tmp_path, criterion="sentence_prediction_r3f"))
    plain_model.load_state_dict(dict(saved))  # strict
    plain_model.eval()
    head = plain_model.classification_heads[HEAD]
    for name in ("dense", "out_proj"):
        torch.testing.assert_close(getattr(head, name).weight, eval_normalised(saved, name))
    with torch.no_grad():
        expected, _ = r4f_model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
        got, _ = plain_model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    torch.testing.assert_close(got, expected)


def test_dense_flag_requires_spectral_norm_flag(data, tmp_path):
    argv = sentence_prediction_args(data, tmp_path, "--r4f-spectral-norm-dense", criterion="sentence_prediction_r3f")
    with pytest.raises(ValueError, match="--r4f-spectral-norm-dense.*--spectral-norm-classification-head"):
        build(argv)


def test_bart_r4f_state_reloads(data, tmp_path):
    """BARTModel's upgrade has the same out_proj.weight lookup; a normalised BART head reloads strictly."""
    from tests.test_r3f import bart_classification_argv

    argv = bart_classification_argv(data, tmp_path, "--spectral-norm-classification-head", "--r4f-spectral-norm-dense")
    _, model, _, sample = build(argv)
    model.train()
    model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert PREFIX + "out_proj.weight_orig" in saved and PREFIX + "dense.weight_orig" in saved
    with pytest.raises(KeyError, match="out_proj.weight"):
        type(model).upgrade_state_dict_named.__wrapped__(model, dict(saved), "")

    _, fresh, _, _ = build(argv)
    fresh.load_state_dict(dict(saved))  # strict
    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected, _ = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
        got, _ = fresh(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    torch.testing.assert_close(got, expected)


def hydra_r4f(data, save_dir, max_update, *extra):
    """The paper's R4F through the hydra launcher: the dense flag lives in the `criterion:` section only."""
    save_dir.mkdir(exist_ok=True)
    proc = run_hydra_train(
        f"task.data={data}",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.restore_file=checkpoint_last.pt",
        "checkpoint.reset_optimizer=false",
        "checkpoint.reset_dataloader=false",
        "checkpoint.reset_meters=false",
        "criterion._name=sentence_prediction_r3f",
        "+criterion.eps=1e-2",
        "+criterion.r4f_spectral_norm_dense=true",
        "+model.spectral_norm_classification_head=true",
        *TINY_ROBERTA_HYDRA,
        f"optimization.max_update={max_update}",
        *extra,
        cwd=save_dir,
    )
    return proc.stdout + proc.stderr


@pytest.mark.e2e
def test_dense_flag_reaches_the_head_under_hydra_and_resumes_exactly(data, tmp_path):
    """hydra hands the model only the `model:` section; the head still gets the dense spectral norm, the
    optimizer is built over the normalised parameters (a resumed run equals a straight one, bit for bit),
    and the checkpoint reloads with both matrices normalised."""
    straight = hydra_r4f(data, tmp_path / "straight", 4, "checkpoint.save_interval_updates=2")
    assert [int(r["num_updates"]) for r in json_logs(straight) if "symm_kl" in r] == [1, 2, 3, 4]
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint_1_2.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    second = hydra_r4f(data, tmp_path / "resumed", 4)
    assert "Loaded checkpoint" in second and "@ 2 updates" in second
    assert [int(r["num_updates"]) for r in json_logs(second) if "symm_kl" in r] == [3, 4]

    a = load_state(tmp_path / "straight" / "checkpoint_last.pt")
    b = load_state(tmp_path / "resumed" / "checkpoint_last.pt")
    assert all(PREFIX + f"{name}.weight{s}" in a for name in ("dense", "out_proj") for s in ("_orig", "_u", "_v"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    _, head = reload_head(tmp_path / "resumed", data)
    assert is_spectral_normed(head.dense) and is_spectral_normed(head.out_proj)


def test_dense_flag_is_read_from_either_config_form(data, tmp_path):
    """argparse namespace (fairseq-train), the `model:` node of a whole config (hydra, hub reload), and a
    detached model node, which cannot see the criterion: the criterion then refuses to train."""
    import argparse

    assert dense_norm_requested(argparse.Namespace(r4f_spectral_norm_dense=True))
    assert not dense_norm_requested(argparse.Namespace())
    run = OmegaConf.create({"model": {"_name": "roberta"}, "criterion": {"r4f_spectral_norm_dense": True}})
    OmegaConf.set_struct(run, True)
    assert dense_norm_requested(run.model)
    assert not dense_norm_requested(OmegaConf.create({"_name": "roberta"}))

    argv = sentence_prediction_args(
        data, tmp_path, "--spectral-norm-classification-head", criterion="sentence_prediction_r3f"
    )
    _, plain_model, _, _ = build(argv)
    with pytest.raises(ValueError, match="--r4f-spectral-norm-dense: classification head .* not spectral-normalised"):
        check_dense_normalised(plain_model, HEAD)


R4F_HEAD = ("--spectral-norm-classification-head", "--r4f-spectral-norm-dense")
INIT_ONLY = "--r4f-spectral-norm-init-only"


def seeded_build(data, tmp_path, *flags):
    torch.manual_seed(3)
    _, model, criterion, sample = build(
        sentence_prediction_args(data, tmp_path, *flags, criterion="sentence_prediction_r3f")
    )
    return model, criterion, sample, torch.get_rng_state()


def largest_singular_value(w) -> float:
    return float(np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)[0])


def test_init_only_head_is_r4fs_head_plain_until_training_starts_then_at_unit_sigma(data, tmp_path):
    """Built: R4F's matrices (the same random draws) as plain parameters. When the trainer has loaded (num
    updates 0) the criterion divides them by their largest singular value (numpy's float64 SVD here); a
    resumed run (num updates > 0) keeps them; training before either is refused."""
    r4f, _, _, r4f_rng = seeded_build(data, tmp_path, *R4F_HEAD)
    model, criterion, sample, rng = seeded_build(data, tmp_path, *R4F_HEAD, INIT_ONLY)
    assert torch.equal(rng, r4f_rng)
    head, r4f_head = model.classification_heads[HEAD], r4f.classification_heads[HEAD]
    w_orig = {n: getattr(r4f_head, n).weight_orig.detach().double().numpy() for n in ("dense", "out_proj")}
    for name in ("dense", "out_proj"):
        assert not is_spectral_normed(getattr(head, name)) and is_spectral_normed(getattr(r4f_head, name))
        assert np.array_equal(getattr(head, name).weight.detach().double().numpy(), w_orig[name])
        assert abs(largest_singular_value(w_orig[name]) - 1) > 0.05  # the rescale will change something
    assert {f"classification_heads.{HEAD}.{n}.weight" for n in ("dense", "out_proj")} <= dict(
        model.named_parameters()
    ).keys()
    model.train()
    with pytest.raises(ValueError, match="--r4f-spectral-norm-init-only: .*Trainer.load_checkpoint"):
        criterion(model, sample)

    criterion.robustft_after_checkpoint_load(model, 0)
    for name in ("dense", "out_proj"):
        w = getattr(head, name).weight.detach().double().numpy()
        np.testing.assert_allclose(w, w_orig[name] / largest_singular_value(w_orig[name]), rtol=1e-6, atol=1e-7)
        assert largest_singular_value(w) == pytest.approx(1, rel=1e-6)
    before = [p.detach().clone() for p in head.parameters()]
    loss, _, logs = criterion(model, sample)
    loss.backward()  # train-mode forwards renormalise nothing
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))
    for name in ("dense", "out_proj"):  # the plain head's exact sigma: 1 after the rescale
        assert logs[f"head_sigma_{name}_num"].item() == pytest.approx(1, rel=1e-5)
        assert logs[f"head_sigma_{name}_den"] == 1

    resumed, resumed_criterion, _, _ = seeded_build(data, tmp_path, *R4F_HEAD, INIT_ONLY)
    resumed_criterion.robustft_after_checkpoint_load(resumed, 7)
    resumed_head = resumed.classification_heads[HEAD]
    assert all(np.array_equal(getattr(resumed_head, n).weight.detach().double().numpy(), w_orig[n]) for n in w_orig)


def test_init_only_needs_r4fs_head_flags_and_the_criterion_checks_the_head(data, tmp_path):
    argv = sentence_prediction_args(
        data, tmp_path, "--spectral-norm-classification-head", INIT_ONLY, criterion="sentence_prediction_r3f"
    )
    with pytest.raises(ValueError, match="--r4f-spectral-norm-init-only: .*--r4f-spectral-norm-dense"):
        build(argv)
    r4f, _, _, _ = seeded_build(data, tmp_path, *R4F_HEAD)
    with pytest.raises(ValueError, match="--r4f-spectral-norm-init-only: classification head .* still spectral"):
        check_init_only(r4f, HEAD)
    run = OmegaConf.create({"model": {"_name": "roberta"}, "criterion": {"r4f_spectral_norm_init_only": True}})
    assert init_only_requested(run.model) and not init_only_requested(OmegaConf.create({"_name": "roberta"}))


@pytest.mark.e2e
def test_init_only_rescales_the_restored_head_at_the_start_and_not_on_resume(data, tmp_path):
    """The head training starts from is --restore-file's (here a plain run's; in the study a converter's
    pooler), so the rescale happens after it is loaded. With lr 0 the first run saves exactly that head / sigma."""
    base = tmp_path / "base"
    train_sentence_prediction(data, base, criterion="sentence_prediction_r3f", max_update=2)
    restored = load_state(base / "checkpoint_last.pt")
    sigma = {n: largest_singular_value(restored[PREFIX + f"{n}.weight"]) for n in ("dense", "out_proj")}
    run = tmp_path / "init_only"
    restore = ("--restore-file", base / "checkpoint_last.pt", "--reset-optimizer", "--reset-dataloader")
    first = run_r4f(data, run, "--r4f-spectral-norm-dense", INIT_ONLY, *restore, "--reset-meters", "--lr", "0").stdout
    logged = f"divided by its largest singular values (dense {sigma['dense']:.4g}, out_proj {sigma['out_proj']:.4g})"
    assert first.count(logged) == 1
    records = [r for r in json_logs(first) if "symm_kl" in r]
    assert [int(r["num_updates"]) for r in records] == [1, 2, 3, 4]
    assert {float(r["head_sigma_dense"]) for r in records} == {1.0}  # lr 0: the head stays at sigma 1
    state = load_state(run / "checkpoint_last.pt")
    assert not any(k.endswith(("_orig", "_u", "_v")) for k in state if k.startswith(PREFIX))
    for name in ("dense", "out_proj"):
        np.testing.assert_allclose(
            state[PREFIX + f"{name}.weight"].double().numpy(),
            restored[PREFIX + f"{name}.weight"].double().numpy() / sigma[name],
            rtol=1e-5,
            atol=1e-7,
        )
    resumed = run_r4f(data, run, "--r4f-spectral-norm-dense", INIT_ONLY, max_update=6).stdout
    assert [int(r["num_updates"]) for r in json_logs(resumed) if "symm_kl" in r] == [5, 6]
    assert "divided by its largest singular values" not in resumed
    after = load_state(run / "checkpoint_last.pt")
    assert not torch.equal(after[PREFIX + "dense.weight"], state[PREFIX + "dense.weight"])  # trained on
    _, head = reload_head(run, data)  # inference: the trained plain head as saved, no rescale (no Trainer)
    for name in ("dense", "out_proj"):
        assert not is_spectral_normed(getattr(head, name))
        assert torch.equal(getattr(head, name).weight, after[PREFIX + f"{name}.weight"])


def test_r4f_logs_the_sigma_its_head_divides_by_and_plain_r3f_logs_none(data, tmp_path):
    r4f, criterion, sample, _ = seeded_build(data, tmp_path, *R4F_HEAD)
    r4f.train()
    _, _, logs = criterion(r4f, sample)
    head = r4f.classification_heads[HEAD]
    for name in ("dense", "out_proj"):
        linear = getattr(head, name)  # the matrix this forward used is weight_orig / the logged sigma
        sigma = logs[f"head_sigma_{name}_num"].item()
        torch.testing.assert_close(linear.weight, linear.weight_orig / sigma)
        assert 0.5 * largest_singular_value(linear.weight_orig.detach()) < sigma
    out_proj_only, criterion, sample, _ = seeded_build(data, tmp_path, "--spectral-norm-classification-head")
    out_proj_only.train()
    _, _, logs = criterion(out_proj_only, sample)  # fairseq's flag: its plain dense costs no SVD, is not logged
    assert {k for k in logs if k.startswith("head_sigma")} == {"head_sigma_out_proj_num", "head_sigma_out_proj_den"}
    plain, plain_criterion, sample, _ = seeded_build(data, tmp_path)
    plain.train()
    _, _, logs = plain_criterion(plain, sample)
    assert not any(k.startswith("head_sigma") for k in logs)


SCALED_STEPS = "--r4f-init-only-scaled-steps"


@pytest.mark.e2e
def test_scaled_steps_move_the_init_only_head_one_over_sigma_as_far_and_resume_exactly(data, tmp_path):
    """From the same restored head (divided by sigma when training starts), one update with the flag moves each
    head matrix 1/sigma as far as one without it and every other parameter identically; the checkpoint keeps
    the scales, so a run resumed at update 2 equals a straight one bit for bit."""
    base = tmp_path / "base"
    train_sentence_prediction(data, base, criterion="sentence_prediction_r3f", max_update=2)
    restored = load_state(base / "checkpoint_last.pt")
    sigma = {n: largest_singular_value(restored[PREFIX + f"{n}.weight"]) for n in ("dense", "out_proj")}
    restore = ("--restore-file", base / "checkpoint_last.pt", "--reset-optimizer", "--reset-dataloader")
    flags = ("--r4f-spectral-norm-dense", INIT_ONLY, *restore, "--reset-meters")
    run_r4f(data, tmp_path / "plain_steps", *flags, max_update=1)
    assert "multiplied by 1/sigma" in run_r4f(data, tmp_path / "scaled", *flags, SCALED_STEPS, max_update=1).stdout
    plain_steps, scaled = (load_state(tmp_path / run / "checkpoint_last.pt") for run in ("plain_steps", "scaled"))
    assert plain_steps.keys() == scaled.keys()
    head_weights = {PREFIX + f"{n}.weight": n for n in sigma}
    for key in plain_steps.keys() - head_weights.keys():
        assert torch.equal(plain_steps[key], scaled[key]), key
    for key, name in head_weights.items():
        start = (restored[key].double() / sigma[name]).float().double()
        step = plain_steps[key].double() - start
        assert step.abs().max() > 1e-4
        np.testing.assert_allclose(scaled[key].double() - start, step / sigma[name], rtol=1e-4, atol=1e-8)

    straight = tmp_path / "straight"
    run_r4f(data, straight, *flags, SCALED_STEPS, "--save-interval-updates", "2", max_update=4)
    (at_2,) = straight.glob("checkpoint_*_2.pt")
    saved = torch.load(at_2, map_location="cpu", weights_only=False)["extra_state"]["robustft_criterion"]
    assert saved["r4f_head_step_scales"] == pytest.approx({n: 1 / s for n, s in sigma.items()}, rel=1e-6)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(at_2, resumed / "checkpoint_last.pt")
    second = run_r4f(data, resumed, "--r4f-spectral-norm-dense", INIT_ONLY, SCALED_STEPS, max_update=4).stdout
    assert "@ 2 updates" in second and "divided by its largest singular values" not in second
    a, b = (load_state(run / "checkpoint_last.pt") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_scaled_steps_need_the_init_only_ablation_fp32_and_their_saved_scales(data, tmp_path):
    with pytest.raises(ValueError, match=f"{SCALED_STEPS}: .*also pass {INIT_ONLY}"):
        seeded_build(data, tmp_path, *R4F_HEAD, SCALED_STEPS)
    model, criterion, _, _ = seeded_build(data, tmp_path, *R4F_HEAD, INIT_ONLY, SCALED_STEPS)
    with pytest.raises(ValueError, match=f"{SCALED_STEPS}: resuming at update 3 .*restart from update 0"):
        criterion.robustft_after_checkpoint_load(model, 3)
    scales = {"dense": 2.5, "out_proj": 1.5}
    criterion.robustft_load_state_dict({"r4f_head_step_scales": scales})
    criterion.robustft_after_checkpoint_load(model, 3)
    assert criterion.robustft_state_dict() == {"r4f_head_step_scales": scales}
    with pytest.raises(ValueError, match=f"{SCALED_STEPS}: .*must be fp32"):
        criterion.robustft_after_checkpoint_load(model.half(), 0)
    _, plain_criterion, _, _ = seeded_build(data, tmp_path, *R4F_HEAD, INIT_ONLY)
    plain_criterion.robustft_load_state_dict({"r4f_head_step_scales": scales})  # a checkpoint's, unused
    assert plain_criterion.robustft_state_dict() == {}
