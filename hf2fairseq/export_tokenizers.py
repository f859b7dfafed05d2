"""transformers tokenizers that give the ids a fine-tuned fairseq model was trained on (for the export).

Each is built from the fairseq dictionary the model was trained with (the data folder's input0/dict.txt +
the <mask> fairseq's tasks append) and the tokenizer files of the model it started from (`--tokenizer-dir`):

- WordPiece (`hf_bert`, `hf_electra`, converted by `python -m hf2fairseq`): the dictionary is
  <s> <pad> </s> <unk> + vocab.txt in order + <mask>, so the vocab is recovered from the dictionary itself;
  only the lowercasing comes from the folder (its convert.json, or a transformers tokenizer_config.json).
- GPT-2 byte-level BPE (fairseq's RoBERTa; imported RoBERTa): dict.txt holds BPE ids; `encoder.json` gives
  their strings and `vocab.bpe` the merges. The vocab is in fairseq's order (transformers' roberta-base is too).
- SentencePiece (XLM-R): dict.txt holds pieces; the `.model` gives their scores and the normaliser
  (its precompiled charsmap, read with sentencepiece's protobuf schema), as transformers' own converter does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SPM_FILE = "sentencepiece.bpe.model"
BERT_SPECIALS = {"[CLS]": "<s>", "[PAD]": "<pad>", "[SEP]": "</s>", "[UNK]": "<unk>", "[MASK]": "<mask>"}


def tokenizer_kind(model_name: str, tokenizer_dir: Path) -> str:
    """wordpiece / gpt2 / sentencepiece, from the architecture and the files the folder holds."""
    if model_name in ("hf_bert", "hf_electra"):
        return "wordpiece"
    gpt2 = (tokenizer_dir / "encoder.json").exists() and (tokenizer_dir / "vocab.bpe").exists()
    spm = sentencepiece_model(tokenizer_dir)
    if gpt2 == (spm is not None):
        raise SystemExit(
            f"--tokenizer-dir {tokenizer_dir}: need either encoder.json + vocab.bpe (RoBERTa's GPT-2 BPE) or a "
            f"SentencePiece model (XLM-R's {SPM_FILE}), found {'both' if gpt2 else 'neither'}"
        )
    return "gpt2" if gpt2 else "sentencepiece"


def sentencepiece_model(folder: Path) -> Path | None:
    if (folder / SPM_FILE).exists():
        return folder / SPM_FILE
    models = sorted(folder.glob("*.model"))
    return models[0] if len(models) == 1 else None


def wordpiece_vocab(dictionary) -> tuple[list[str], list[int]]:
    """(BERT vocab in its own order, fairseq row of every vocab id) from a converted model's dictionary."""
    mask = dictionary.index("<mask>")
    vocab = dictionary.symbols[dictionary.nspecial : mask]
    missing = [t for t in BERT_SPECIALS if t not in vocab]
    if missing or mask != len(dictionary) - 1:
        raise SystemExit(
            "the data's input0/dict.txt is not a converted BERT vocabulary (vocab.txt in order, as "
            f"`python -m hf2fairseq` writes dict.txt and glue_preprocess --srcdict copies it): lacks {missing}"
        )
    special_rows = {t: dictionary.index(s) for t, s in BERT_SPECIALS.items()}
    return vocab, [special_rows.get(t, dictionary.nspecial + j) for j, t in enumerate(vocab)]


def lowercase_of(tokenizer_dir: Path) -> bool:
    for name, key in (("convert.json", "lowercase"), ("tokenizer_config.json", "do_lower_case")):
        if (tokenizer_dir / name).exists():
            return bool(json.loads((tokenizer_dir / name).read_text()).get(key, True))
    raise SystemExit(
        f"--tokenizer-dir {tokenizer_dir}: no convert.json (`python -m hf2fairseq` output) or "
        "tokenizer_config.json to tell whether the WordPiece tokenizer lowercases"
    )


def build_wordpiece(transformers, vocab: list[str], tokenizer_dir: Path, model_name: str, max_len: int):
    cls = getattr(transformers, "ElectraTokenizer" if model_name == "hf_electra" else "BertTokenizer")
    given = tokenizer_dir / "vocab.txt"
    if given.exists() and given.read_text(encoding="utf-8").splitlines() != vocab:
        raise SystemExit(f"--tokenizer-dir {tokenizer_dir}: vocab.txt differs from the data's input0/dict.txt")
    return cls(
        vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=lowercase_of(tokenizer_dir), model_max_length=max_len
    )


def roberta_vocab(dictionary, encoder_json: Path) -> dict[str, int]:
    """token -> fairseq id: the BPE string of every GPT-2 id in the dictionary; other symbols as they are."""
    by_id = {i: t for t, i in json.loads(encoder_json.read_text(encoding="utf-8")).items()}
    vocab: dict[str, int] = {}
    for i, sym in enumerate(dictionary.symbols):
        token = by_id.get(int(sym), sym) if i >= dictionary.nspecial and sym.isdigit() else sym
        if token in vocab:
            raise SystemExit(f"dictionary symbols {vocab[token]} and {i} are both the token {token!r}")
        vocab[token] = i
    return vocab


def build_gpt2(transformers, dictionary, tokenizer_dir: Path, max_len: int):
    vocab = roberta_vocab(dictionary, tokenizer_dir / "encoder.json")
    # fairseq's get_encoder (gpt2_bpe_utils.py) reads lines[1:-1]: a "#version" header, one merge per line
    lines = (tokenizer_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    merges = [tuple(line.split()) for line in lines]
    try:
        return transformers.RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)
    except Exception as err:  # tokenizers refuses merges whose pieces the vocab lacks
        raise SystemExit(
            f"--tokenizer-dir {tokenizer_dir}: vocab.bpe does not fit the dictionary ({type(err).__name__}: {err})"
        ) from err


def build_sentencepiece(transformers, dictionary, tokenizer_dir: Path, max_len: int):
    import sentencepiece as spm

    path = sentencepiece_model(tokenizer_dir)
    assert path is not None  # tokenizer_kind checked it
    sp = spm.SentencePieceProcessor(model_file=str(path))
    known = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    floor = min(known.values()) - 10.0  # symbols the model lacks (madeupword...): never preferred
    specials = set(dictionary.symbols[: dictionary.nspecial]) | {"<mask>"}
    vocab = [(s, 0.0 if s in specials else known.get(s, floor)) for s in dictionary.symbols]
    return transformers.XLMRobertaTokenizer(
        vocab=vocab, _spm_precompiled_charsmap=precompiled_charsmap(path), model_max_length=max_len
    )


def precompiled_charsmap(path: Path) -> bytes | None:
    """The normaliser table of a SentencePiece model (what transformers' SpmConverter reads)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # the schema needs protobuf
        raise SystemExit(f"reading {path} needs protobuf (pip install protobuf): {err}") from err
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    proto.ParseFromString(path.read_bytes())
    return proto.normalizer_spec.precompiled_charsmap or None


def copy_sentencepiece_if_aligned(dictionary, tokenizer_dir: Path, out_dir: Path) -> bool:
    """Copy the .model as the hub's XLM-R folders have it, when transformers' fixed mapping (fairseq id =
    SentencePiece id + 1 past the 4 specials) holds for this dictionary."""
    import sentencepiece as spm

    path = sentencepiece_model(tokenizer_dir)
    assert path is not None
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    if dictionary.symbols[dictionary.nspecial : -1] != pieces:
        return False
    shutil.copyfile(path, out_dir / SPM_FILE)
    return True
