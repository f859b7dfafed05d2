"""transformers RoBERTa / XLM-R checkpoints -> fairseq `roberta_base` checkpoints (`python -m hf2fairseq`).

Both are fairseq's own RoBERTa architecture (post-LN, learned positions, LayerNorm eps 1e-5), so the layers
copy over as for BERT (convert.LAYER_KEYS). What differs is bookkeeping:

- Dictionary order. fairseq's is fixed: <s> <pad> </s> <unk> (ids 0-3), the lines of dict.txt, then the
  <mask> its tasks append (fairseq/tasks/sentence_prediction.py, masked_lm.py). roberta-base's and
  xlm-roberta-base's vocabularies were converted from fairseq and are in that order already, but a model
  trained with transformers need not be (`tokenizers`' trainers put the special tokens first, in the order
  given). So the embedding rows (and the MLM head's bias) are permuted into fairseq's order: rows 0-3 =
  transformers' cls / pad / sep / unk tokens, then every other id in increasing order, then the mask token;
  embedding rows no token uses become fairseq's `madeupwordNNNN` padding symbols.
- Positions. transformers' RoBERTa numbers the tokens from padding_idx + 1 (its
  create_position_ids_from_input_ids), fairseq from its pad index 1 + 1 = 2 (fairseq/utils.py make_positions):
  fairseq row 2 + p = transformers row pad_token_id + 1 + p, so `--max-positions` is
  max_position_embeddings - pad_token_id - 1. RoBERTa's single token type (row 0, added to every token) is
  folded into the positions.
- Tokenizer files for fairseq's own tokenizers (what `glue_preprocess` and the hub's `encode` use):
  byte-level BPE (RoBERTa): `encoder.json` (token -> transformers id) + `vocab.bpe` (the merges) for fairseq's
  GPT-2 BPE, and dict.txt lists transformers ids, as fairseq's RoBERTa dict.txt lists GPT-2 ids;
  SentencePiece (XLM-R): the checkpoint's `sentencepiece.bpe.model`, and dict.txt lists the pieces, as
  XLM-R's does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hf2fairseq.convert import (
    ROBERTA_FAMILY,
    arch_args,
    build_fairseq_model,
    check_supported,
    put_layers,
    read_config,
    read_hf_weights,
    save_checkpoint,
    state_writer,
    strip_prefix,
)
from hf2fairseq.hf_extra import require_transformers

FAIRSEQ_EPS = 1e-5  # fairseq/modules/layer_norm.py: LayerNorm(..., eps=1e-5), not configurable
SPM_FILE = "sentencepiece.bpe.model"  # XLM-R's file name (fairseq and transformers alike)
# fairseq's symbols for rows no token uses (Dictionary.pad_to_multiple_)
MADEUP = "madeupword{:04d}"


def tokenizer_kind(tok) -> str:
    """ "gpt2" (byte-level BPE, RoBERTa) or "sentencepiece" (Unigram, XLM-R), from the backend's json."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec["model"]["type"], json.dumps(spec.get("pre_tokenizer"))
    if model == "BPE" and '"ByteLevel"' in pre:
        if getattr(tok, "add_prefix_space", False):
            raise SystemExit("the tokenizer has add_prefix_space=True; fairseq's GPT-2 BPE never adds a leading space")
        return "gpt2"
    if model == "Unigram":
        return "sentencepiece"
    raise SystemExit(
        f"tokenizer model {model} (pre-tokenizer {pre}): fairseq reads byte-level BPE (RoBERTa) or "
        "SentencePiece Unigram (XLM-R) tokenizers"
    )


def fairseq_order(tok, vocab_size: int) -> tuple[list[int], list[str | None]]:
    """transformers ids in fairseq row order, and the token of every dict.txt row (None: unused row)."""
    names = ("cls_token", "pad_token", "sep_token", "unk_token", "mask_token")
    ids = [getattr(tok, f"{n}_id") for n in names]
    missing = [n for n, i in zip(names, ids) if i is None]
    if missing:
        raise SystemExit(f"the tokenizer defines no {', '.join(missing)}: fairseq's dictionary needs all of {names}")
    if len(set(ids)) != len(ids):
        raise SystemExit(f"the tokenizer's {names} are not 5 distinct tokens: {ids}")
    id_to_token = {i: t for t, i in tok.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise SystemExit(f"the tokenizer has id {max(id_to_token)}, the embedding only {vocab_size} rows")
    specials, mask = ids[:4], ids[4]
    rest = [i for i in range(vocab_size) if i not in ids]
    return specials + rest + [mask], [id_to_token.get(i) for i in rest]


def dict_symbols(kind: str, rest_ids: list[int], rest_tokens: list[str | None]) -> list[str]:
    """dict.txt's symbols: transformers ids (GPT-2 BPE emits ids) or pieces (SentencePiece emits pieces)."""
    out, unused = [], 0
    for i, tok in zip(rest_ids, rest_tokens):
        if tok is None:
            out.append(MADEUP.format(unused))
            unused += 1
        else:
            out.append(str(i) if kind == "gpt2" else tok)
    return out


def write_tokenizer_files(kind: str, tok, hf_dir: Path, out_dir: Path) -> list[str]:
    """fairseq's tokenizer files; returns the glue_preprocess flags that use them."""
    if kind == "gpt2":
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
        # fairseq's get_encoder skips the first line (GPT-2's "#version" header) and the last (empty)
        (out_dir / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in lines), encoding="utf-8")
        (out_dir / "encoder.json").write_text(json.dumps(tok.get_vocab(), ensure_ascii=False), encoding="utf-8")
        return ["--tokenizer", "gpt2", "--gpt2-encoder-json", "encoder.json", "--gpt2-vocab-bpe", "vocab.bpe"]
    models = [hf_dir / SPM_FILE] if (hf_dir / SPM_FILE).exists() else sorted(hf_dir.glob("*.model"))
    if not models:
        raise SystemExit(
            f"--hf-dir {hf_dir}: no {SPM_FILE}; fairseq tokenizes XLM-R with SentencePiece: copy the "
            "SentencePiece model of the original checkpoint into the folder"
        )
    shutil.copyfile(models[0], out_dir / SPM_FILE)
    return ["--tokenizer", "sentencepiece", "--sentencepiece-model", SPM_FILE]


def check_roberta_config(config: dict, tok) -> int:
    """The checks fairseq's roberta arch needs; returns transformers' pad index (the position offset)."""
    check_supported(config, ROBERTA_FAMILY)
    eps = float(config.get("layer_norm_eps", 1e-12))
    if abs(eps - FAIRSEQ_EPS) > 1e-9:
        raise SystemExit(
            f"config.json layer_norm_eps is {eps:g}; fairseq's RoBERTa LayerNorm eps is fixed at 1e-5 "
            "(fairseq/modules/layer_norm.py), so this checkpoint cannot be converted exactly"
        )
    pad = config.get("pad_token_id", 1)
    if pad != tok.pad_token_id:
        raise SystemExit(f"config.json pad_token_id {pad} != the tokenizer's pad token id {tok.pad_token_id}")
    if config.get("type_vocab_size", 1) > 1:
        raise SystemExit(f"type_vocab_size {config['type_vocab_size']}: fairseq's RoBERTa has no token types")
    return pad


def convert_state(hf_state: dict, rows: list[int], hf_pad: int, num_layers: int, model) -> dict:
    """Fill a freshly built fairseq RoBERTa model's state dict from transformers' tensors."""
    hf = strip_prefix(hf_state)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    put = state_writer(sd)
    enc = "encoder.sentence_encoder."
    index = torch.tensor(rows)
    put(enc + "embed_tokens.weight", hf["embeddings.word_embeddings.weight"][index])
    table = torch.zeros_like(sd[enc + "embed_positions.weight"])
    start = model.encoder.sentence_encoder.embed_positions.padding_idx + 1
    pos = hf["embeddings.position_embeddings.weight"][hf_pad + 1 :][: table.shape[0] - start]
    n = pos.shape[0]
    if "embeddings.token_type_embeddings.weight" in hf:  # type 0 on every token
        pos = pos + hf["embeddings.token_type_embeddings.weight"][0]
    table[start : start + n] = pos
    put(enc + "embed_positions.weight", table)
    put(enc + "layernorm_embedding.weight", hf["embeddings.LayerNorm.weight"])
    put(enc + "layernorm_embedding.bias", hf["embeddings.LayerNorm.bias"])
    put_layers(put, hf, num_layers, enc)
    if "lm_head.dense.weight" in hf:  # RobertaForMaskedLM; else fairseq's init (unused by fine-tuning)
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            put(f"encoder.lm_head.{name}", hf[f"lm_head.{name}"])
        put("encoder.lm_head.bias", hf["lm_head.bias"][index])
    sd["encoder.lm_head.weight"] = sd[enc + "embed_tokens.weight"]  # tied (roberta_base)
    return sd


def convert_roberta(
    hf_dir: Path, out_dir: Path, source: str | None = None, max_positions: int | None = None, final_dir=None
) -> dict:
    """Convert a transformers RoBERTa / XLM-R folder into `out_dir` (a temp folder that becomes `final_dir`
    under `convert.convert`); returns the convert.json content."""
    transformers = require_transformers("importing a RoBERTa / XLM-R checkpoint")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_config(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf_pad = check_roberta_config(config, tok)
    usable = config["max_position_embeddings"] - hf_pad - 1
    if max_positions is not None and not 0 < max_positions <= usable:
        raise SystemExit(
            f"--max-positions must be in [1, {usable}] (max_position_embeddings - pad_token_id - 1), "
            f"got {max_positions}"
        )
    max_positions = max_positions or usable
    kind = tokenizer_kind(tok)
    rows, rest_tokens = fairseq_order(tok, config["vocab_size"])
    symbols = dict_symbols(kind, rows[4:-1], rest_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dict.txt").write_text("".join(f"{s} 1\n" for s in symbols), encoding="utf-8")
    preprocess_flags = write_tokenizer_files(kind, tok, hf_dir, out_dir)
    cfg, _task, model = build_fairseq_model(out_dir, config, "roberta_base", max_positions)
    hf_state = read_hf_weights(hf_dir)
    state = convert_state(hf_state, rows, hf_pad, config["num_hidden_layers"], model)
    weights = strip_prefix(hf_state)
    weights.refuse_unused()
    model.load_state_dict(state, strict=True)  # fails loudly on any key/shape mismatch
    save_checkpoint(out_dir / "model.pt", cfg, state, data=final_dir or out_dir)
    meta = {
        "source": source or str(hf_dir),
        "hf_config": config,
        "arch": "roberta_base",
        "train_args": arch_args(config, "roberta_base", max_positions),
        "tokenizer": kind,
        "glue_preprocess_args_in_this_folder": preprocess_flags + ["--srcdict", "dict.txt"],
        "dictionary_remapped": rows != list(range(len(rows))),
        "position_offset": {"hf_pad_token_id": hf_pad, "fairseq_row_of_position_0": 2},
        "dictionary_size_with_mask": len(rows),
        "has_mlm_head": any(k.startswith("lm_head.") for k in hf_state),
        "dropped_heads": weights.dropped(),
        "input_layout": "RoBERTa <s> A </s> </s> B </s> = fairseq --init-token 0 --separator-token 2",
    }
    (out_dir / "convert.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
