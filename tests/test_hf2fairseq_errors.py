"""hf2fairseq on damaged or mismatched inputs: the output folder is replaced whole or not at all, every tensor
of the checkpoint is used or refused by name (heads fairseq has no place for are listed), and every error
names the file. Tiny BERT checkpoints written by hand with safetensors (no transformers needed)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import hf2fairseq  # noqa: F401  (registers arch hf_bert)
from hf2fairseq.convert import convert, main
from robustft_common import checkpoint_files

H, FFN, POS = 8, 16, 16
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]


def tiny_bert(folder, layers=1, config_layers=None, words=WORDS, nsp=False, drop=()):
    """A BertForPreTraining-style checkpoint folder (bert. prefix, pooler, optional NSP head)."""
    g = torch.Generator().manual_seed(len(words) + layers)
    tensors = {}

    def put(name, *shape):
        tensors[name] = torch.randn(*shape, generator=g)

    put("bert.embeddings.word_embeddings.weight", len(words), H)
    put("bert.embeddings.position_embeddings.weight", POS, H)
    put("bert.embeddings.token_type_embeddings.weight", 2, H)
    for part in ("weight", "bias"):
        put(f"bert.embeddings.LayerNorm.{part}", H)
    for i in range(layers):
        for name, shape in (
            ("attention.self.query", (H, H)),
            ("attention.self.key", (H, H)),
            ("attention.self.value", (H, H)),
            ("attention.output.dense", (H, H)),
            ("attention.output.LayerNorm", (H,)),
            ("intermediate.dense", (FFN, H)),
            ("output.dense", (H, FFN)),
            ("output.LayerNorm", (H,)),
        ):
            put(f"bert.encoder.layer.{i}.{name}.weight", *shape)
            put(f"bert.encoder.layer.{i}.{name}.bias", shape[0])
    put("bert.pooler.dense.weight", H, H)
    put("bert.pooler.dense.bias", H)
    if nsp:
        put("cls.seq_relationship.weight", 2, H)
        put("cls.seq_relationship.bias", 2)
    for name in drop:
        del tensors[name]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "bert",
        "vocab_size": len(words),
        "hidden_size": H,
        "num_hidden_layers": config_layers or layers,
        "num_attention_heads": 2,
        "intermediate_size": FFN,
        "max_position_embeddings": POS,
        "type_vocab_size": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("".join(w + "\n" for w in words))
    return folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_conversion_replaces_an_earlier_one_whole_and_lists_dropped_heads(tmp_path):
    from fairseq import checkpoint_utils

    out = tmp_path / "out"
    meta = convert(tiny_bert(tmp_path / "a", nsp=True), out)
    assert meta["dropped_heads"] == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert json.loads((out / "convert.json").read_text())["dropped_heads"] == meta["dropped_heads"]
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out / "model.pt"))  # verified against model.pt.sha256
    assert checkpoint_files.read_digests(out / "model.pt") and state["cfg"]["task"]["data"] == str(out)
    convert(tiny_bert(tmp_path / "b", words=[*WORDS, "dog"]), out)  # an earlier conversion is replaced
    assert (out / "dict.txt").read_text().split("\n")[-2] == "dog 1"
    assert (
        checkpoint_utils.load_checkpoint_to_cpu(str(out / "model.pt"))["model"][
            "encoder.sentence_encoder.embed_tokens.weight"
        ].shape[0]
        == 4 + (len(WORDS) + 1) + 1
    )  # fairseq's 4 specials, the new vocab, <mask>
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]  # no temp folders left


def test_failing_conversion_leaves_the_earlier_output_untouched(tmp_path):
    """The reported case: a checkpoint with a layer more than its config says, into a folder holding an
    earlier conversion. It is refused naming the file and the unused tensors; the folder keeps the old files."""
    out = tmp_path / "out"
    convert(tiny_bert(tmp_path / "good"), out)
    before = _snapshot(out)
    bad = tiny_bert(tmp_path / "bad", layers=2, config_layers=1, words=[*WORDS, "dog"])
    with pytest.raises(SystemExit) as err:
        convert(bad, out)
    message = str(err.value)
    assert message.startswith(f"{bad / 'model.safetensors'}: 16 tensor(s) the conversion does not use")
    assert "encoder.layer.1.attention.output.LayerNorm.bias" in message
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["bad", "good", "out"]


def test_missing_tensor_names_file_and_tensor(tmp_path):
    src = tiny_bert(tmp_path / "src", drop=["bert.encoder.layer.0.output.dense.weight"])
    with pytest.raises(SystemExit, match=f"{src / 'model.safetensors'}: no tensor 'encoder.layer.0.output.dense"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_bad_input_file_is_named(tmp_path):
    src = tiny_bert(tmp_path / "src")
    good_config = (src / "config.json").read_text()
    (src / "config.json").write_text('{"model_type": "bert", ')
    with pytest.raises(SystemExit, match=f"{src / 'config.json'}: not a readable JSON file"):
        convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**json.loads(good_config), "hidden_size": "8"}))
    with pytest.raises(SystemExit, match=f"{src / 'config.json'}: hidden_size must be positive integers"):
        convert(src, tmp_path / "out")
    (src / "config.json").write_text(good_config)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # truncated
    with pytest.raises(SystemExit, match=f"{weights}: cannot read the weights"):
        convert(src, tmp_path / "out")
    weights.unlink()
    torch.save({"w": torch.zeros(1), "hook": os.system}, src / "pytorch_model.bin")  # a pickled callable
    with pytest.raises(SystemExit, match=f"{src / 'pytorch_model.bin'}: cannot read the weights"):
        convert(src, tmp_path / "out")
    (src / "vocab.txt").write_bytes(b"\xff\xfe[PAD]\n")
    with pytest.raises(SystemExit, match=f"{src / 'vocab.txt'}: unreadable"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_with_other_files_is_refused(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=f"--output-dir {out} holds files that are not a conversion \\(notes.txt\\)"):
        main(["--hf-dir", str(tiny_bert(tmp_path / "src")), "--output-dir", str(out)])
    assert os.listdir(out) == ["notes.txt"]
