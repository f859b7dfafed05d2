"""The GPU check (scripts/gpu_check.py) and its carry bundle (robustft_experiments/gpu_bundle.py), on CPU.

The vocabulary restriction (hf2fairseq/restrict.py) is checked against the full model: on the same text
the restricted model computes what the full model computes. The CPU mode runs the check end to end (fp16
smoke runs and a fine-tune of a converted tiny BERT from a bundle built by the bundle's own code; the bench
step's tiny benchmark is left out for time, tests/test_benchmarks.py runs it). Building the whole bundle
needs the package index and is not a test (`make gpu-bundle`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from tests.fairseq_helpers import REPO
from tests.test_convert import _tiny_rte, tiny_bert  # noqa: F401  (module fixture: a converted tiny BERT)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _script("gpu_check")
fp16_check = _script("fp16_check")


@pytest.fixture(scope="module")
def tiny_glue(tiny_bert):  # noqa: F811
    """RTE-layout tsv files over the tiny BERT's words (test_convert's writer), and their full binarization."""
    root = tiny_bert / "rte"
    data = _tiny_rte(root, tiny_bert / "fs" / "vocab.txt", tiny_bert / "fs" / "dict.txt")
    return root / "glue", data


def _features(model_dir, data_dir, vocab, split="valid"):
    """Last-layer features of every example of `split` (input0 + input1 as sentence_prediction joins them)."""
    from fairseq.data import Dictionary, data_utils
    from fairseq.models.roberta import RobertaModel

    hub = RobertaModel.from_pretrained(str(model_dir), checkpoint_file="model.pt", bpe="bert", bpe_vocab_file=vocab)
    hub.eval()
    dictionary = Dictionary.load(str(data_dir / "input0" / "dict.txt"))
    a = data_utils.load_indexed_dataset(str(data_dir / "input0" / split), dictionary)
    b = data_utils.load_indexed_dataset(str(data_dir / "input1" / split), dictionary)
    out = []
    with torch.no_grad():
        for i in range(len(a)):
            tokens = torch.cat([torch.tensor([0]), a[i], b[i]]).long()
            out.append(hub.extract_features(tokens))
    return out


@pytest.mark.e2e  # no training, but it shares the converted tiny BERT (seconds to build) with the e2e tests
def test_restricted_model_computes_what_the_full_model_computes(tiny_bert, tiny_glue, tmp_path):  # noqa: F811
    from glue_preprocess import preprocess
    from hf2fairseq.restrict import restrict_to_data, same_token_strings

    glue, full_data = tiny_glue
    full = tiny_bert / "fs"
    meta = restrict_to_data(full, [full_data], tmp_path / "model", half=False)
    preprocess(
        glue_dir=str(glue),
        tasks=["RTE"],
        output_dir=str(tmp_path / "data"),
        tokenizer="wordpiece",
        wordpiece_vocab=str(full / "vocab.txt"),
        srcdict=str(tmp_path / "model" / "dict.txt"),
        log=lambda *a, **k: None,
    )
    data = tmp_path / "data" / "RTE-bin"
    assert same_token_strings(full_data, full / "dict.txt", data, tmp_path / "model" / "dict.txt") == []
    words = (tmp_path / "model" / "dict.txt").read_text().split("\n")[:-1]
    assert meta["restricted"]["dictionary_words"] == len(words) < meta["restricted"]["full_dictionary_words"]
    vocab = str(full / "vocab.txt")
    for got, want in zip(_features(tmp_path / "model", data, vocab), _features(full, full_data, vocab), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stale_plugin_files_names_what_differs_from_the_tree():
    methods = "robustft_common/methods.py"
    manifest = {
        "plugin_sources": {
            methods: hashlib.sha256((REPO / methods).read_bytes()).hexdigest(),
            "robustft_common/glue_tasks.py": "0" * 64,
            "robustft_common/gone.py": "0" * 64,
        }
    }
    assert gpu_check.stale_plugin_files(manifest) == ["robustft_common/glue_tasks.py", "robustft_common/gone.py"]


def test_fp16_plan_runs_mode_by_mode_and_noisytune_after_its_baseline():
    assert fp16_check.STARTS_FROM == {"noisytune": "vanilla_adamax"}
    pairs = fp16_check.plan(["noisytune", "r3f", "vanilla_adamax"], ["fp16", "memory_efficient_fp16"])
    order = [("r3f", "fp16"), ("vanilla_adamax", "fp16"), ("noisytune", "fp16")]
    assert pairs == order + [(m, "memory_efficient_fp16") for m, _ in order]
    assert fp16_check.still_needed(pairs, 1, "vanilla_adamax", "fp16")
    assert not fp16_check.still_needed(pairs, 2, "vanilla_adamax", "fp16")


@pytest.mark.e2e
def test_run_bounded_stops_the_whole_process_group(tmp_path):
    mark = tmp_path / "child-ran-on"
    started = time.time()
    run = gpu_check.run_bounded(
        ["sh", "-c", f"(sleep 2; touch {mark}) & sleep 30"], time.time() + 1, tmp_path / "log", dict(os.environ)
    )
    assert run["timed_out"] and run["returncode"] != 0 and time.time() - started < 10
    time.sleep(2.5)
    assert not mark.exists()  # the background child went with its group


@pytest.mark.e2e
def test_cpu_mode_end_to_end(tiny_bert, tiny_glue, tmp_path):  # noqa: F811
    from robustft_experiments.gpu_bundle import build_finetune_assets

    bundle = tmp_path / "bundle"
    build_finetune_assets(tiny_bert / "hf", tiny_glue[0], bundle / "finetune", max_positions=64)
    assert all(
        v.dtype == torch.float16
        for v in torch.load(bundle / "finetune" / "model" / "model.pt", weights_only=True)["model"].values()
        if v.is_floating_point()
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--cpu",
            "--out",
            str(out),
            "--bundle",
            str(bundle),
            "--fp16-methods",
            "noisytune,vanilla_adamax",
            "--steps",  # the bench step's tiny run costs two more fairseq processes: left to test_benchmarks
            "fp16,finetune",
            "--finetune-methods",
            "vanilla",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["install"]["environment"]["torch"] == torch.__version__
    assert (
        result["suggested_results_dir"].startswith("benchmarks/results/gpu/")
        and "_cpu_" in result["suggested_results_dir"]
    )

    fp16 = result["steps"]["fp16"]["runs"]
    assert [r["method"] for r in fp16] == ["vanilla_adamax", "noisytune"]  # the start before its user
    assert all(r["ok"] and r["updates"] == 2 and r["mode"] == "memory_efficient_fp16" for r in fp16), fp16
    assert fp16[1]["noise_mean"] == {"noisytune_applied": 1.0}

    (run,) = result["steps"]["finetune"]["runs"]
    assert run["method"] == "vanilla" and run["status"] == "ok"
    assert run["num_updates"] == [2] and 0 <= run["dev_accuracy"][0] <= 100  # one validation, after update 2

    md = (out / "gpu_check.md").read_text()
    assert list(result["steps"]) == ["fp16", "finetune"]
    assert all(f"## {step}:" in md for step in ("fp16", "finetune"))
    with tarfile.open(out / "gpu_check-logs.tar.gz") as tar:
        names = tar.getnames()
    assert "fp16/summary.json" in names and "finetune/runs/RTE/vanilla/seed1/train.log" in names
