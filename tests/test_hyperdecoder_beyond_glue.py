"""Issue 17, in-process: MRQA scoring (official normalisation, lowest-NLL window), the baselines as archs
(Hyperformer task adapters, the parameter-matched single adapter), and the multi-task task's
--split-validation-test halves and --one-task-per-batch schedule."""

from __future__ import annotations

import copy
import random
import re
import string
from argparse import Namespace
from collections import Counter

import numpy as np
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.sequence_generator import SequenceGenerator

from hyperdecoder_src import mrqa_scoring
from hyperdecoder_src.models.adapters import AdapterHypernetwork
from hyperdecoder_src.models.baselines import (
    adapter_params,
    hyperdecoder_trainable_params,
    single_adapter_bart_base,
    single_adapter_bart_large,
)
from hyperdecoder_src.models.hyperdecoder_bart import (
    HyperdecoderDecoder,
    hyperdecoder_bart_base,
    hyperdecoder_bart_large,
    hyperdecoder_bart_tiny,
)
from hyperdecoder_src.task_batches import schedule_task_batches, split_halves, task_probabilities
from robustft_testing.synthetic_data import write_text2text
from tests.test_hyperdecoder_model import build, sources

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# MRQA scoring


def official_normalize(s: str) -> str:
    """mrqa_official_eval.py L20-35, written out step by step (independent of mrqa_scoring)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(pred: str, gold: str) -> float:
    p, g = official_normalize(pred).split(), official_normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * (same / len(p)) * (same / len(g)) / (same / len(p) + same / len(g))


def test_official_normalisation_em_f1():
    assert mrqa_scoring.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert mrqa_scoring.normalize_answer("an apple a day") == "apple day"
    assert mrqa_scoring.exact_match("the Old Mill.", "old mill") == 1.0
    assert mrqa_scoring.f1("old mill", "the old mill house") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert mrqa_scoring.f1("", "old mill") == 0.0 and mrqa_scoring.best_over_golds("x", []) == (0.0, 0.0)
    rng = random.Random(0)
    words = ["the", "old", "Mill", "a", "mill,", "house", "An", "Ferrand", "family", "'s"]
    for _ in range(200):
        pred = " ".join(rng.choices(words, k=rng.randint(0, 4)))
        gold = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        assert mrqa_scoring.normalize_answer(pred) == official_normalize(pred)
        assert mrqa_scoring.f1(pred, gold) == pytest.approx(official_f1(pred, gold))


def test_lowest_nll_non_empty_window_wins_in_any_row_order():
    golds = {0: ["old mill"], 1: ["Ferrand family"], 2: ["four hundred metres"]}
    windows = {  # question -> [(answer, nll)] in window order
        0: [("old mill", 0.9), ("lime trees", 0.4), ("", 0.1)],  # lowest non-empty: "lime trees" (wrong)
        1: [("", 0.2), ("", 0.3), ("Ferrand family", 1.5)],  # the answer only in the last window
        2: [("", 0.5), ("", 0.6)],  # unanswered -> ""
    }
    rows = [
        mrqa_scoring.window_row(d, q, w, a, nll, golds[q])
        for q, ws in windows.items()
        for w, (a, nll) in enumerate(ws)
        for d in [0 if q < 2 else 1]
    ]
    random.Random(1).shuffle(rows)
    # independent: the reference's rule (mrqa_eval/eval.py L86-93) on each question's window list
    expected = {}
    for q, ws in windows.items():
        answered = [w for w in ws if w[0] != ""]
        pred = answered[[w[1] for w in answered].index(min(w[1] for w in answered))][0] if answered else ""
        assert pred == mrqa_scoring.pick_window(ws)
        expected[q] = (max(official_normalize(pred) == official_normalize(g) for g in golds[q]), pred)
    got = mrqa_scoring.question_scores(rows)
    assert {q: bool(em) for q, (_, em, _) in got.items()} == {q: bool(e) for q, (e, _) in expected.items()}
    assert expected[0][1] == "lime trees" and expected[1][1] == "Ferrand family" and expected[2][1] == ""
    scores = mrqa_scoring.dataset_scores(rows, ["SQuAD", "BioASQ"])
    assert scores["SQuAD"] == {"em": 50.0, "f1": 50.0, "n": 2} and scores["BioASQ"]["em"] == 0.0
    assert mrqa_scoring.macro_average(scores, ["SQuAD", "BioASQ"], "em") == 25.0


# ---------------------------------------------------------------------------------------------
# --split-validation-test and --one-task-per-batch bookkeeping


def test_split_halves_is_the_reference_halving():
    first, second = split_halves(11, 42)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(42)).tolist()  # reference seed 42
    assert first.tolist() == sorted(order[:5]) and second.tolist() == sorted(order[5:])
    assert split_halves(11, 43)[0].tolist() != first.tolist()
    groups = np.asarray(["q1", "q1", "q2", "q3", "q3", "q3", "q4"])
    a, b = split_halves(len(groups), 42, groups)
    assert sorted(a.tolist() + b.tolist()) == list(range(7))
    assert not set(groups[a]) & set(groups[b]) and len(set(groups[a])) == 2  # whole questions, half of them


def test_task_batches_one_task_per_block_and_temperature():
    batches = {"a": [np.array([i]) for i in range(30)], "b": [np.array([100 + i]) for i in range(10)]}
    sizes = {"a": 300, "b": 100}
    assert task_probabilities(sizes, 1.0) == pytest.approx({"a": 0.75, "b": 0.25})
    hot = task_probabilities(sizes, 10.0)
    assert hot["b"] == pytest.approx(0.25**0.1 / (0.75**0.1 + 0.25**0.1))  # hyperformer's temperature
    out = schedule_task_batches(batches, sizes, 1.0, 2, np.random.RandomState(0))
    assert len(out) == 40  # as many batches as the tasks have, in whole blocks of num_shards
    tasks_of = ["a" if b[0] < 100 else "b" for b in out]
    assert all(tasks_of[i] == tasks_of[i + 1] for i in range(0, 40, 2))  # both workers of a step: one task
    assert 0.5 < tasks_of.count("a") / 40 < 0.95


# ---------------------------------------------------------------------------------------------
# baselines as architectures


def test_single_adapter_width_matches_the_hyperdecoder_count():
    tiny = Namespace()
    hyperdecoder_bart_tiny(tiny)
    target = hyperdecoder_trainable_params(tiny)
    assert target == 2192 + 28172  # the built tiny Hyperdecoder's count (test_hyperdecoder_model / _e2e)
    single, _, _ = build("single_adapter_bart_tiny")
    c = single.parameter_counts()
    width = single.args.encoder_adapter_dim
    assert c["trainable"] == c["encoder_adapters"] + c["decoder_adapters"] == 4 * adapter_params(64, width)
    assert all(abs(4 * adapter_params(64, w) - target) >= abs(c["trainable"] - target) for w in (width - 1, width + 1))
    for arch, hyper_arch, expected in (
        (single_adapter_bart_large, hyperdecoder_bart_large, 424),
        (single_adapter_bart_base, hyperdecoder_bart_base, 795),
    ):
        args, ref = Namespace(), Namespace()
        arch(args)
        hyper_arch(ref)
        assert args.encoder_adapter_dim == args.decoder_adapter_dim == expected
        layers = args.encoder_layers + args.decoder_layers
        gap = abs(layers * adapter_params(args.encoder_embed_dim, expected) - hyperdecoder_trainable_params(ref))
        assert gap <= layers * (2 * args.encoder_embed_dim + 1) / 2  # nearest width
    # the reference's generator on T5-large (spec section 1) is what the closed form gives
    assert AdapterHypernetwork.num_params(24, 1024, 1024, 64, 128, 10) == 17_181_360


@pytest.fixture(scope="module")
def hyperformer():
    model, task, d = build("hyperformer_bart_tiny", "--adapter-tasks", "rte,cola,stsb", seed=4)
    with torch.no_grad():  # generated weights start ~1e-3 of a fan-in init: make them matter
        for stack in (model.encoder, model.decoder):
            for head in (stack.param_gen.weight_down, stack.param_gen.weight_up, stack.param_gen.bias_up):
                head.weight.mul_(3000.0)
    return model, d


def test_hyperformer_counts_and_task_conditioning(hyperformer):
    model, d = hyperformer
    assert model.adapter_task_names == ["rte", "cola", "stsb"]
    c = model.parameter_counts()
    C, a, hb, le, L, T = 64, 8, 16, 10, 2, 3
    per_stack = AdapterHypernetwork.num_params(L, C, C, a, hb, le) + T * C  # generator + task embedding, no MLP
    assert c["encoder_generator"] == c["decoder_generator"] == per_stack and c["trainable"] == 2 * per_stack
    src, lengths = sources(d, [[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    prev = torch.tensor([[d.eos(), d.index("w5")]] * 3)
    with torch.no_grad():
        out, _ = model(src, lengths, prev, adapter_task_ids=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(out[0], out[1])  # same input, same task -> same output
    assert not torch.allclose(out[0], out[2], atol=1e-4)  # another task -> other adapters
    with pytest.raises(RuntimeError, match="no task ids"):
        model(src, lengths, prev)


def generate(model, d, rows, task_ids, beam=3):
    src, lengths = sources(d, rows)
    gen = SequenceGenerator([model], d, beam_size=beam, max_len_a=0, max_len_b=10, min_len=1)
    net_input = {"src_tokens": src, "src_lengths": lengths, "adapter_task_ids": task_ids}
    with torch.no_grad():
        hyps = gen.generate([model], {"net_input": net_input, "id": torch.arange(len(rows))})
    return [[(h["tokens"].tolist(), round(float(h["score"]), 4)) for h in per_src] for per_src in hyps]


def test_hyperformer_beam_batch_mixing_tasks_equals_each_alone(hyperformer, monkeypatch):
    model, d = hyperformer
    rows = [[1, 2, 3, 4, 5], [30, 31], [7, 8, 9, 10], [11, 3]]
    task_ids = torch.tensor([2, 0, 2, 1])
    calls = []
    original = HyperdecoderDecoder._conditioned_weights

    def counting(self, encoder_out):
        out = original(self, encoder_out)
        calls.append(out[0][0].size(0))
        return out

    monkeypatch.setattr(HyperdecoderDecoder, "_conditioned_weights", counting)
    batched = generate(model, d, rows, task_ids)
    assert calls == [3]  # once per batch, one weight row per distinct task
    alone = [generate(model, d, [r], task_ids[i : i + 1])[0] for i, r in enumerate(rows)]
    assert batched == alone
    assert len({tuple(h[0][0]) for h in batched}) > 1


def test_bad_task_adapter_configs_name_the_flag():
    with pytest.raises(ValueError, match="--adapter-tasks"):
        build("hyperformer_bart_tiny")  # translation task: no task names anywhere


# ---------------------------------------------------------------------------------------------
# the multi-task task: halves, task ids, one task per batch


@pytest.fixture(scope="module")
def t2t_data(tmp_path_factory):
    rng = random.Random(0)

    def rows(task, n):
        src = [
            f"{task} sentence: " + " ".join(f"w{rng.randrange(30)}" for _ in range(rng.randint(2, 6))) for _ in range(n)
        ]
        return src, [f"label{rng.randrange(2)}" for _ in range(n)]

    train_a, train_b = rows("rte", 24), rows("cola", 8)
    splits = {
        "train": (train_a[0] + train_b[0], train_a[1] + train_b[1]),
        "valid_rte": rows("rte", 9),
        "valid_cola": rows("cola", 6),
        "test_cola": rows("cola", 4),
    }
    out = write_text2text(tmp_path_factory.mktemp("t2t") / "bin", splits)
    for name, (src, _) in splits.items():
        (out / f"{name}.task").write_text("".join(s.split()[0] + "\n" for s in src))
    return out


@pytest.fixture(scope="module")
def t2t_cfg(t2t_data):
    argv = [str(t2t_data), "--task", "hyperdecoder_glue", "-s", "src", "-t", "tgt", "--arch", "hyperformer_bart_tiny"]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def make_task(cfg, **task_flags):
    cfg = copy.deepcopy(cfg)
    for key, value in task_flags.items():
        cfg.task[key] = value
    return tasks.setup_task(cfg.task), cfg


def source_rows(dataset):
    return [tuple(dataset[i]["source"].tolist()) for i in range(len(dataset))]


def test_split_validation_test_halves_dev_splits(t2t_cfg):
    task, _ = make_task(t2t_cfg, split_validation_test=True)
    plain, _ = make_task(t2t_cfg)
    for name in ("valid_rte", "test_rte", "valid_cola", "test_cola", "valid", "test"):
        task.load_dataset(name)
    for name in ("valid_rte", "valid_cola", "test_cola"):
        plain.load_dataset(name)
    full = source_rows(plain.dataset("valid_rte"))
    first, second = split_halves(9, 42)
    assert source_rows(task.dataset("valid_rte")) == [full[i] for i in first]  # validation: first half
    assert source_rows(task.dataset("test_rte")) == [full[i] for i in second]  # test: the held-out half
    # valid_cola has a real test_cola beside it: both stay whole
    assert source_rows(task.dataset("valid_cola")) == source_rows(plain.dataset("valid_cola"))
    assert source_rows(task.dataset("test_cola")) == source_rows(plain.dataset("test_cola"))
    assert len(task.dataset("valid")) == 4 + 6 and len(task.dataset("test")) == 5 + 4
    assert list(task.dataset("test").task_names) == ["cola"] * 4 + ["rte"] * 5


def test_task_ids_reach_the_model_and_one_task_per_batch(t2t_cfg):
    task, cfg = make_task(t2t_cfg, one_task_per_batch=True, task_sampling_temperature=2.0)
    task.load_dataset("valid_rte")
    task.load_dataset("train")
    assert task.adapter_task_names() == ["cola", "rte"]  # sorted names of train.task (no tasks.json)
    batch = task.dataset("valid_rte").collater([task.dataset("valid_rte")[i] for i in range(3)])
    assert "adapter_task_ids" not in batch["net_input"]  # no model yet: plain models get plain batches
    model = task.build_model(cfg.model)
    assert model.adapter_task_names == ["cola", "rte"]
    batch = task.dataset("valid_rte").collater([task.dataset("valid_rte")[i] for i in range(3)])
    assert batch["net_input"]["adapter_task_ids"].tolist() == [1, 1, 1]
    names = task.dataset("train").task_names
    steps = []
    for shard in (0, 1):
        itr = task.get_batch_iterator(
            dataset=task.dataset("train"), max_sentences=4, num_shards=2, shard_id=shard, seed=3
        ).next_epoch_itr(shuffle=True)
        steps.append([set(names[b["id"].numpy()]) for b in itr])
    assert all(len(s) == 1 for shard in steps for s in shard)  # one task per batch
    assert [s for s in steps[0]] == [s for s in steps[1]]  # the same task on both workers at each step
    with torch.no_grad():
        loss = model(**batch["net_input"])[0].sum()
    assert torch.isfinite(loss)
