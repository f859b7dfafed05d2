"""The shared sentence-prediction base: loss and metrics against independent sklearn/scipy values."""

import numpy as np
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from robustft_common.sentence_prediction import RobustSentencePredictionCriterion
from tests.fairseq_helpers import TINY_ROBERTA, make_sentence_prediction_data


def _setup(data, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(data),
            "--task",
            "sentence_prediction",
            "--criterion",
            "sentence_prediction",
            "--init-token",
            "0",
            "--separator-token",
            "2",
            *TINY_ROBERTA,
            "--cpu",
            *extra,
        ],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    # A freshly initialised model predicts one class for everything; spread the weights so the
    # metrics are non-trivial.
    for param in model.parameters():
        if param.dim() > 1:
            param.data.normal_(0.0, 0.5)
    return task, model, RobustSentencePredictionCriterion(cfg.criterion, task)


def _run_valid(task, model, criterion, batch_size=8):
    itr = task.get_batch_iterator(
        dataset=task.dataset("valid"), max_sentences=batch_size, ignore_invalid_inputs=False
    ).next_epoch_itr(shuffle=False)
    preds, targets, losses = [], [], []
    with metrics.aggregate(new_root=True) as agg, torch.no_grad():
        for sample in itr:
            loss, _, log = criterion(model, sample)
            criterion.__class__.reduce_metrics([log])
            logits, _ = model(
                **sample["net_input"], features_only=True, classification_head_name="sentence_classification_head"
            )
            preds.append(logits)
            targets.append(sample["target"].view(-1))
            losses.append(loss.item())
        values = agg.get_smoothed_values()
    return torch.cat(preds), torch.cat(targets), sum(losses), values


@pytest.fixture(scope="module")
def binary_data(tmp_path_factory):
    return make_sentence_prediction_data(tmp_path_factory.mktemp("bin"), n_valid=40, label_names=("0", "1"))


def test_classification_metrics_over_several_batches(binary_data):
    task, model, criterion = _setup(binary_data, "--num-classes", "2", "--report-mcc", "--report-acc-and-f1")
    logits, targets, loss_sum, values = _run_valid(task, model, criterion)
    # Independent: map class ids back to the label strings, as GLUE scorers see them.
    names = task.label_dictionary
    pred_labels = np.array([int(names[i + names.nspecial]) for i in logits.argmax(-1).tolist()])
    true_labels = np.array([int(names[i + names.nspecial]) for i in targets.tolist()])
    assert len(true_labels) == 40 and 0 < pred_labels.sum() < 40, "degenerate predictions"
    expected_nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    assert loss_sum == pytest.approx(expected_nll.item(), rel=1e-5)
    assert values["accuracy"] == pytest.approx(100 * (pred_labels == true_labels).mean(), abs=0.05)
    assert values["mcc"] == pytest.approx(round(100 * matthews_corrcoef(true_labels, pred_labels), 1))
    assert values["f1"] == pytest.approx(round(100 * f1_score(true_labels, pred_labels), 1))


def test_regression_metrics_over_several_batches(tmp_path):
    data = make_sentence_prediction_data(tmp_path, n_valid=40, regression=True)
    task, model, criterion = _setup(data, "--num-classes", "1", "--regression-target", "--report-pearson-and-spearman")
    preds, targets, loss_sum, values = _run_valid(task, model, criterion)
    preds, targets = preds.view(-1).double().numpy(), targets.double().numpy()
    assert loss_sum == pytest.approx(((preds - targets) ** 2).sum(), rel=1e-5)
    assert values["pearson"] == pytest.approx(round(100 * pearsonr(preds, targets)[0], 1), abs=0.051)
    assert values["spearman"] == pytest.approx(round(100 * spearmanr(preds, targets)[0], 1), abs=0.051)
