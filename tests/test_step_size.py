"""benchmarks/quality/step_size.py's arithmetic: the displacement is the Frobenius ratio over all the layers'
linear weights together, computed here by hand; the loss is read from fairseq's own log lines, ChildTuning's
extra column included."""

import importlib.util

import pytest
import torch

from tests.fairseq_helpers import REPO


@pytest.fixture(scope="module")
def step_size():
    spec = importlib.util.spec_from_file_location("step_size", REPO / "benchmarks" / "quality" / "step_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_weights_are_the_transformer_layers_linear_matrices(step_size):
    state = {
        "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight": torch.ones(2, 2),
        "encoder.sentence_encoder.layers.0.self_attn.q_proj.bias": torch.ones(2),
        "encoder.sentence_encoder.layers.3.fc1.weight": torch.ones(3, 2),
        "encoder.sentence_encoder.layers.0.self_attn_layer_norm.weight": torch.ones(2),
        "encoder.sentence_encoder.layers.0.fc1.mixout_target": torch.ones(3, 2),
        "encoder.sentence_encoder.embed_tokens.weight": torch.ones(5, 2),
        "classification_heads.sentence_classification_head.dense.weight": torch.ones(2, 2),
    }
    assert sorted(step_size.layer_weights(state)) == [
        "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight",
        "encoder.sentence_encoder.layers.3.fc1.weight",
    ]


def test_displacement_is_one_frobenius_ratio_over_all_tensors(step_size):
    start = {"a": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([[0.0], [4.0]])}  # ||W_0|| = 5
    end = {"a": torch.tensor([[3.0, 1.0]]), "b": torch.tensor([[2.0], [4.0]]), "unused": torch.ones(1)}
    assert step_size.displacement(start, end) == pytest.approx(5**0.5 / 5)  # ||(1, 2)|| / 5
    assert step_size.displacement(start, start) == 0.0


def test_loss_is_the_mean_of_the_last_logged_updates(step_size):
    log = "\n".join(
        [
            "2026-12-02 18:23:03 | INFO | train_inner | epoch 001:      1 / 63 loss=1.002, accuracy=50, wps=1",
            "2026-12-02 18:23:04 | INFO | train_inner | epoch 001:      2 / 63 childtuning_kept=0.3, loss=0.9, "
            "accuracy=90.3, wps=225.9",
            "2026-12-02 18:23:05 | INFO | train_inner | epoch 001:      3 / 63 loss=0.7, accuracy=60, wps=1",
            "2026-12-02 18:23:06 | INFO | train | epoch 001 | loss 0.123 | accuracy 91.6 | wps 310",
        ]
    )
    assert step_size.mean_logged_loss(log, last=2) == pytest.approx(0.8)
    assert step_size.mean_logged_loss(log, last=10) == pytest.approx((1.002 + 0.9 + 0.7) / 3)
    assert step_size.mean_logged_loss("no training lines") is None
