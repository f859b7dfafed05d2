"""Restrict a converted model to the tokens a binarized dataset uses, optionally in fp16, to carry it small.

all-MiniLM-L6-v2 converted is 91 MB in fp32, more than a GPU machine's carry limit leaves beside fairseq
(README "GPU check"). RTE (train + dev) uses 14,376 of its 30,522 WordPiece tokens, and a fine-tune only
ever reads the embedding rows of tokens in its data, so the rows of the other tokens can go: the model
restricted to the data's tokens computes exactly what the full one computes on that data, provided the data
is binarized again with the restricted dictionary (same token strings, new ids; `same_token_strings` checks
it). The word embeddings, the tied MLM output projection (`encoder.lm_head.weight`, the same tensor) and its
bias keep the rows of: fairseq's four specials, the dataset's tokens, and the `<mask>` the task appends last.

fp16 storage (`half=True`) rounds every weight to fp16 (relative error <= 2^-11): what a `--fp16` run
computes with anyway, but its fp32 master weights then start from the rounded values.

    restrict_to_data(CONVERTED_DIR, [DATA/RTE-bin], OUT_DIR, half=True)   # OUT_DIR/model.pt, dict.txt, ...
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

NSPECIAL = 4  # fairseq's <s> <pad> </s> <unk> (= BERT's [CLS] [PAD] [SEP] [UNK], hf2fairseq/convert.py)
# parameters indexed by token id (rows of the dictionary + <mask>); lm_head.weight is embed_tokens itself
TOKEN_ROWS = ("encoder.sentence_encoder.embed_tokens.weight", "encoder.lm_head.weight", "encoder.lm_head.bias")
TEXT_COLUMNS = ("input0", "input1")  # RoBERTa GLUE layout; label/ has its own dictionary


def used_token_ids(data_dirs: Iterable[Path], dictionary) -> set[int]:
    """Every token id of every split of the text columns (`input0/`, `input1/`) under `data_dirs`."""
    from fairseq.data import data_utils

    used: set[int] = set()
    for data in data_dirs:
        for column in TEXT_COLUMNS:
            for idx in sorted((Path(data) / column).glob("*.idx")):
                dataset = data_utils.load_indexed_dataset(str(idx.with_suffix("")), dictionary)
                for i in range(len(dataset)):
                    used.update(dataset[i].tolist())
    return used


def kept_rows(used: set[int], dict_size: int) -> list[int]:
    """Row ids to keep, in order: the specials, the used dictionary ids, then `<mask>` (id `dict_size`,
    appended by sentence_prediction / masked_lm after the dictionary)."""
    words = sorted(i for i in used if NSPECIAL <= i < dict_size)
    return [*range(NSPECIAL), *words, dict_size]


def restrict_state(model: dict, rows: Sequence[int], half: bool) -> dict:
    """The checkpoint's state dict with the token-indexed tensors cut to `rows` (and floats in fp16)."""
    index = torch.tensor(rows)
    out = {}
    for key, value in model.items():
        if key in TOKEN_ROWS:
            value = value[index]
        if half and value.is_floating_point():
            value = value.half()
        out[key] = value.clone()  # no shared storage with the full tensors (torch.save would keep them)
    # tied: one tensor in the saved file, as fairseq's own checkpoints store it
    if TOKEN_ROWS[1] in out:
        out[TOKEN_ROWS[1]] = out[TOKEN_ROWS[0]]
    return out


def restrict_to_data(model_dir: Path, data_dirs: Sequence[Path], out_dir: Path, half: bool = True) -> dict:
    """Write OUT_DIR/model.pt, dict.txt and convert.json: `model_dir` (hf2fairseq output) restricted to the
    tokens of `data_dirs` (binarized with `model_dir/dict.txt`). Returns the new convert.json content."""
    from fairseq.data import Dictionary

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dictionary = Dictionary.load(str(model_dir / "dict.txt"))
    rows = kept_rows(used_token_ids(data_dirs, dictionary), len(dictionary))
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    embed = state["model"][TOKEN_ROWS[0]]
    if embed.shape[0] != len(dictionary) + 1:
        raise ValueError(
            f"{model_dir}/model.pt has {embed.shape[0]} token rows, expected {len(dictionary) + 1} "
            f"(dict.txt + <mask>); was it converted with this dict.txt?"
        )
    state["model"] = restrict_state(state["model"], rows, half)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = [dictionary[i] for i in rows[NSPECIAL:-1]]
    (out_dir / "dict.txt").write_text("".join(f"{w} 1\n" for w in words), encoding="utf-8")
    tmp = out_dir / "model.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out_dir / "model.pt")
    meta = json.loads((model_dir / "convert.json").read_text())
    meta["restricted"] = {
        "from": str(model_dir),
        "data": [str(d) for d in data_dirs],
        "dictionary_words": len(words),
        "full_dictionary_words": len(dictionary) - NSPECIAL,
        "dtype": "float16" if half else "float32",
        "note": "token rows restricted to the data's tokens; binarize that data again with this dict.txt",
    }
    meta["dictionary_size_with_mask"] = len(rows)
    (out_dir / "convert.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def same_token_strings(data_a: Path, dict_a: Path, data_b: Path, dict_b: Path) -> list[str]:
    """Splits/columns whose token strings differ between two binarizations of the same text (empty = same)."""
    from fairseq.data import Dictionary, data_utils

    da, db = Dictionary.load(str(dict_a)), Dictionary.load(str(dict_b))
    differ = []
    for column in TEXT_COLUMNS:
        for idx in sorted((Path(data_a) / column).glob("*.idx")):
            name = f"{column}/{idx.stem}"
            a = data_utils.load_indexed_dataset(str(idx.with_suffix("")), da)
            b = data_utils.load_indexed_dataset(str(Path(data_b) / column / idx.stem), db)
            if b is None or len(a) != len(b):
                differ.append(name)
                continue
            if any([da[t] for t in a[i].tolist()] != [db[t] for t in b[i].tolist()] for i in range(len(a))):
                differ.append(name)
    return differ
