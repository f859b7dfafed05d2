"""Bad configuration is refused before any update, with a message naming the flag.

Most cases are built in-process exactly the way `fairseq_cli.train.main` does (parse -> task -> model ->
criterion -> Trainer -> optimizer; flags checked at the first forward go through one training-mode
forward of the criterion); three go through the real `fairseq-train` to pin the CLI contract
(non-zero exit, flag named on stderr; forked from the tests' fork server, tests/test_forkserver.py).
"""

import os

import pytest

from robustft_testing import forkserver
from tests.fairseq_helpers import BIN, REPO, sentence_prediction_args
from tests.test_distributed import make_sp_data, make_t2t_data, method_argv

# Every case starts fairseq's training stack in-process (config, task, model, criterion, Trainer, one
# forward and backward: about a second each), the three CLI cases a fairseq-train: end-to-end, deselected
# by -m 'not e2e' with the other runs of fairseq's training machinery
pytestmark = pytest.mark.e2e

R3F = ["--criterion", "sentence_prediction_r3f"]
HYPE = ["--criterion", "hype_sentence_prediction"]
PATS = ["--optimizer", "adamax_pats"]
SAGE = ["--optimizer", "adamax_sage"]
NOISYTUNE = [*PATS, "--finetune-from-model", "/nonexistent/pretrained.pt", "--noisytune-lambda", "0.15"]

# (id, extra flags on the tiny RoBERTa sentence-prediction run, text the error must contain)
SENTENCE_PREDICTION_CASES = [
    ("hype_flags_without_hype_type", [*R3F, "--hype-eps", "1e-2"], "--hype-type"),
    ("r3f_eps_negative", [*R3F, "--eps", "-1e-5"], "--eps"),
    ("r3f_eps_nan", [*R3F, "--eps", "nan"], "--eps"),
    ("r3f_eps_inf", [*R3F, "--eps", "inf"], "--eps"),
    ("r3f_lambda_negative", [*R3F, "--r3f-lambda", "-0.5"], "--r3f-lambda"),
    ("r3f_lambda_nan", [*R3F, "--r3f-lambda", "nan"], "--r3f-lambda"),
    ("r3f_noise_type_unknown", [*R3F, "--noise-type", "gaussian"], "--noise-type"),
    ("r3f_regression_kl_unknown", [*R3F, "--r3f-regression-kl", "l2"], "--r3f-regression-kl"),
    ("r4f_dense_without_head_norm", [*R3F, "--r4f-spectral-norm-dense"], "--r4f-spectral-norm-dense"),
    ("hype_eps_negative", [*HYPE, "--hype-eps", "-1e-5"], "--hype-eps"),
    ("hype_eps_nan", [*HYPE, "--hype-eps", "nan"], "--hype-eps"),
    ("hype_type_unknown", [*HYPE, "--hype-type", "laplace"], "--hype-type"),
    ("hype_one_sided_with_normal", [*HYPE, "--hype-type", "normal", "--hype-uniform", "one_sided"], "--hype-uniform"),
    (
        "hype_only_intermediate_and_top",
        [*HYPE, "--hype-only-intermediate", "--hype-top-layers", "1"],
        "--hype-only-intermediate",
    ),
    ("hype_top_layers_negative", [*HYPE, "--hype-top-layers", "-1"], "--hype-top-layers"),
    ("hype_top_layers_past_depth", [*HYPE, "--hype-top-layers", "3"], "--hype-top-layers"),
    ("hype_low_layers_past_depth", [*HYPE, "--hype-low-layers", "5"], "--hype-low-layers"),
    ("hype_decoder_on_encoder_only", [*HYPE, "--hype-decoder"], "--hype-decoder"),
    ("hype_intermediate_pre_ln", [*HYPE, "--hype-intermediate", "--encoder-normalize-before"], "--hype-intermediate"),
    ("hype_on_r3f_eps_negative", [*R3F, "--hype-type", "normal", "--hype-eps", "-1"], "--hype-eps"),
    ("hype_on_r3f_past_depth", [*R3F, "--hype-type", "normal", "--hype-top-layers", "3"], "--hype-top-layers"),
    ("hype_flag_on_stock_criterion", ["--criterion", "sentence_prediction", "--hype-type", "normal"], "--hype-type"),
    ("r3f_flag_on_stock_criterion", ["--criterion", "sentence_prediction", "--r3f-lambda", "1"], "--r3f-lambda"),
    ("pats_flag_on_stock_optimizer", ["--optimizer", "adam", "--pats-noise", "1e-3"], "--pats-noise"),
    ("pats_noise_negative", [*PATS, "--pats-noise", "-1e-3"], "--pats-noise"),
    ("pats_noise_nan", [*PATS, "--pats-noise", "nan"], "--pats-noise"),
    ("pats_prob_above_one", [*PATS, "--pats-prob", "1.5"], "--pats-prob"),
    ("pats_prob_negative", [*PATS, "--pats-prob", "-0.1"], "--pats-prob"),
    ("pats_prob_nan", [*PATS, "--pats-prob", "nan"], "--pats-prob"),
    ("pats_beta_one", [*PATS, "--pats-beta", "1.0"], "--pats-beta"),
    ("pats_margin_negative", [*PATS, "--pats-margin", "-0.01"], "--pats-margin"),
    ("pats_margin_nan", [*PATS, "--pats-margin", "nan"], "--pats-margin"),
    ("pats_margin_inf", [*PATS, "--pats-margin", "inf"], "--pats-margin"),
    ("pats_eps_zero", [*PATS, "--pats-eps", "0"], "--pats-eps"),
    ("pats_eps_inf", [*PATS, "--pats-eps", "inf"], "--pats-eps"),  # would turn the noise off
    ("pats_max_ratio_negative", [*PATS, "--pats-max-ratio", "-1"], "--pats-max-ratio"),
    ("pats_filter_matches_nothing", [*PATS, "--pats-param-include", "no_such_param"], "--pats-param-include"),
    ("pats_filter_excludes_all", [*PATS, "--pats-param-exclude", "."], "--pats-param-exclude"),
    ("pats_filter_bad_regex", [*PATS, "--pats-param-include", "layers.(0"], "--pats-param-include"),
    ("pats_adamax_betas", [*PATS, "--adamax-betas", "(0.9, 1.5)"], "--adamax-betas"),
    ("pats_weight_decay_negative", [*PATS, "--weight-decay", "-0.1"], "--weight-decay"),
    # flat fp16 (fairseq's one fp32 buffer) on CPU: the plugin's message, not fairseq's CUDA assertion
    ("pats_flat_fp16", [*PATS, "--fp16"], "--fp16-no-flatten-grads or use --memory-efficient-fp16"),
    ("sage_flat_fp16", [*SAGE, "--fp16", "--fp16-init-scale", "4"], "--fp16-no-flatten-grads"),
    ("sage_beta3_one", [*SAGE, "--sage-beta3", "1.0"], "--sage-beta3"),
    ("sage_eps_zero", [*SAGE, "--sage-eps", "0"], "--sage-eps"),
    ("sage_eps_inf", [*SAGE, "--sage-eps", "inf"], "--sage-eps"),  # would freeze the selected parameters
    ("sage_filter_matches_nothing", [*SAGE, "--sage-param-include", "no_such_param"], "--sage-param-include"),
    ("noisytune_lambda_negative", [*NOISYTUNE, "--noisytune-lambda", "-0.1"], "--noisytune-lambda"),
    ("noisytune_lambda_nan", [*NOISYTUNE, "--noisytune-lambda", "nan"], "--noisytune-lambda"),
    ("noisytune_from_scratch", [*PATS, "--noisytune-lambda", "0.15"], "--noisytune-lambda"),
    (
        "noisytune_filter_matches_nothing",
        [*NOISYTUNE, "--noisytune-param-include", "no_such_param"],
        "--noisytune-param-include",
    ),
]


HD = ["--criterion", "label_smoothed_cross_entropy"]
SEQ2SEQ_CASES = [
    ("encoder_adapter_dim_zero", ["--encoder-adapter-dim", "0"], "--encoder-adapter-dim"),
    ("decoder_adapter_dim_negative", ["--decoder-adapter-dim", "-8"], "--decoder-adapter-dim"),
    ("hypernetwork_bottleneck_zero", ["--hypernetwork-bottleneck", "0"], "--hypernetwork-bottleneck"),
    ("layer_embed_dim_zero", ["--layer-embed-dim", "0"], "--layer-embed-dim"),
    ("adapter_kind_unknown", ["--decoder-adapter", "lora"], "--decoder-adapter"),
    ("generated_with_checkpoint_activations", ["--checkpoint-activations"], "--checkpoint-activations"),
    ("generated_with_layerdrop", ["--decoder-layerdrop", "0.1"], "layerdrop"),
    ("eval_bpe_unknown", ["--hyperdecoder-eval-glue", "--hyperdecoder-eval-bpe", "bytes"], "--hyperdecoder-eval-bpe"),
    ("seq2seq_r3f_eps_negative", ["--criterion", "label_smoothed_cross_entropy_r3f", "--eps", "-1"], "--eps"),
    (
        "seq2seq_r3f_kl_norm_unknown",
        ["--criterion", "label_smoothed_cross_entropy_r3f", "--r3f-kl-norm", "batch"],
        "--r3f-kl-norm",
    ),
    (
        "seq2seq_hype_past_depth",
        [
            "--criterion",
            "label_smoothed_cross_entropy_r3f",
            "--hype-type",
            "normal",
            "--hype-decoder",
            "--hype-low-layers",
            "3",
        ],
        "--hype-low-layers",
    ),
    ("nothing_trainable", ["--encoder-adapter", "none", "--decoder-adapter", "none"], "--decoder-adapter"),
    (
        "eval_args_not_json",
        ["--hyperdecoder-eval-glue", "--hyperdecoder-eval-args", "{beam: 1}"],
        "--hyperdecoder-eval-args",
    ),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_config")
    return make_sp_data(tmp), make_t2t_data(tmp), tmp


def build_and_step(argv):
    """What fairseq-train does before and at its first update, minus the data loop: the error (if any)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    args = options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.lr_step(0)  # builds the optimizer and scheduler, as load_checkpoint does at startup
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(4)])
    model.train()
    loss, _, _ = criterion(model, sample)
    loss.backward()


def refusal(argv, capsys):
    """The error message a bad configuration produces (argparse exits with the message on stderr)."""
    try:
        build_and_step(argv)
    except SystemExit as err:
        assert err.code != 0
        return capsys.readouterr().err
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _sp_argv(data, extra):
    sp, t2t, tmp = data
    return sentence_prediction_args(sp, tmp / "unused", *extra)


def _s2s_argv(data, extra):
    sp, t2t, tmp = data
    return method_argv("hyperdecoder", sp, t2t, tmp / "unused", 1, *extra)


def _params(cases):
    return [pytest.param(extra, text, id=name) for name, extra, text in cases]


def test_valid_configurations_build(data, capsys):
    """The harness itself accepts the good configurations (else every refusal below would be vacuous)."""
    for extra in (
        [],
        R3F,
        HYPE,
        PATS,
        SAGE,
        [*R3F, "--hype-type", "normal", "--spectral-norm-classification-head", "--r4f-spectral-norm-dense"],
        [*PATS, "--fp16", "--fp16-no-flatten-grads"],  # what the flat-fp16 refusal advises
    ):
        assert refusal(_sp_argv(data, extra), capsys) is None, extra
    for extra in (HD, ["--criterion", "label_smoothed_cross_entropy_r3f", "--hype-type", "normal", "--hype-decoder"]):
        assert refusal(_s2s_argv(data, extra), capsys) is None, extra


@pytest.mark.parametrize("extra,text", _params(SENTENCE_PREDICTION_CASES))
def test_sentence_prediction_refused(data, capsys, extra, text):
    message = refusal(_sp_argv(data, extra), capsys)
    assert message is not None, "accepted silently"
    assert text in message, message


@pytest.mark.parametrize("extra,text", _params(SEQ2SEQ_CASES))
def test_hyperdecoder_refused(data, capsys, extra, text):
    message = refusal(_s2s_argv(data, extra), capsys)
    assert message is not None, "accepted silently"
    assert text in message, message


CLI_CASES = [
    ([*R3F, "--eps", "nan"], "--eps"),
    ([*HYPE, "--hype-top-layers", "3"], "--hype-top-layers"),  # checked at the first forward
    ([*PATS, "--pats-param-include", "no_such_param"], "--pats-param-include"),
]


def test_real_cli_exits_nonzero_naming_the_flag(data):
    for i, (extra, text) in enumerate(CLI_CASES):
        argv = _sp_argv(data, extra)
        argv[argv.index("--save-dir") + 1] = str(data[2] / f"cli{i}")
        proc = forkserver.run(
            [BIN / "fairseq-train", *argv], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300
        )
        assert proc.returncode != 0, extra
        assert text in proc.stderr, proc.stderr[-3000:]
        assert "num_updates" not in proc.stdout + proc.stderr  # refused before the first update was logged
