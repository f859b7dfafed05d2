"""Tiny random transformers checkpoints (RoBERTa, XLM-R, ELECTRA) with real tokenizers, for the tests.

Each is built with transformers' own config and model classes and written by `save_pretrained`, as a
model on the hub would be; the tokenizers are trained on the given texts with `tokenizers` /
`sentencepiece` (no download). Needs transformers (the `hf` extra).

The RoBERTa tokenizer deliberately lists its special tokens in another order than fairseq's
(<pad> <s> </s> <unk> <mask>: pad id 0, mask id 4), so the import has to remap the dictionary and shift
the positions (transformers' RoBERTa numbers positions from pad_token_id + 1).
"""

from __future__ import annotations

import json
from pathlib import Path

# small, so that every test model stays a few hundred KB: hidden 32, 2 layers, 2 heads, FFN 64
HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 64
ROBERTA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def roberta_tokenizer(texts, vocab_size: int = 2000):
    """A byte-level BPE RobertaTokenizer trained on `texts` (special tokens in ROBERTA_SPECIALS' order)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=ROBERTA_SPECIALS)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)  # type: ignore[arg-type]  # pairs, as tokenizers' BPE takes


def xlmr_tokenizer(texts, folder: Path, vocab_size: int = 1000):
    """An XLMRobertaTokenizer over a SentencePiece unigram model trained on `texts`, saved in `folder`."""
    from transformers import XLMRobertaTokenizer

    from glue_preprocess.tokenization import train_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(texts, folder / "sentencepiece.bpe", vocab_size)  # XLM-R's file name
    (folder / "sentencepiece.bpe.vocab").unlink()
    return XLMRobertaTokenizer.from_pretrained(str(folder))


def wordpiece_vocab(texts, vocab_size: int = 2000) -> list[str]:
    """A lowercased BERT WordPiece vocab trained on `texts` ([PAD] [UNK] [CLS] [SEP] [MASK] first)."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1)
    return [t for t, _ in sorted(wp.get_vocab().items(), key=lambda kv: kv[1])]


def save_roberta(folder: Path, texts, kind: str = "roberta", seed: int = 0, max_positions: int = 512) -> Path:
    """A random RobertaForMaskedLM (kind "roberta") or XLMRobertaForMaskedLM ("xlm-roberta") + tokenizer."""
    import torch
    import transformers

    folder = Path(folder)
    tok = roberta_tokenizer(texts) if kind == "roberta" else xlmr_tokenizer(texts, folder)
    config_class, model_class = {
        "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
        "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaForMaskedLM),
    }[kind]
    config = config_class(
        vocab_size=len(tok),
        max_position_embeddings=max_positions + tok.pad_token_id + 1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        type_vocab_size=1,
        layer_norm_eps=1e-5,  # RoBERTa's (fairseq's fixed eps); the config class defaults to BERT's 1e-12
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize_constants(model)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_electra(folder: Path, texts, seed: int = 0, embedding_size: int = 16, max_positions: int = 512) -> Path:
    """A random ElectraForPreTraining (discriminator) with a narrower embedding_size + WordPiece vocab.txt."""
    import torch
    import transformers

    folder = Path(folder)
    vocab = wordpiece_vocab(texts)
    config = transformers.ElectraConfig(
        vocab_size=len(vocab),
        embedding_size=embedding_size,
        max_position_embeddings=max_positions,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    torch.manual_seed(seed)
    model = transformers.ElectraForPreTraining(config)
    _randomize_constants(model)
    model.save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    tokenizer_class = getattr(transformers, "ElectraTokenizer")  # noqa: B009  (a lazy attribute mypy cannot see)
    tokenizer_class(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(folder))
    return folder


def _randomize_constants(model) -> None:
    """Biases start at 0 and LayerNorm weights at 1: perturb every constant tensor, so that a bias or
    LayerNorm put in the wrong place changes the output."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.1)


def glue_subset(root: Path, tasks, glue_dir: Path, n_train: int = 16, n_dev: int = 8) -> Path:
    """`root/<TASK>/{train,dev}.tsv`: the first rows of the real GLUE files under `glue_dir`, or, where they
    are absent, rows in the same layout (from the GLUE task table) made of FALLBACK_SENTENCES."""
    from robustft_common.glue_tasks import resolve_task

    for name in tasks:
        spec = resolve_task(name)
        (root / spec.name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("valid", n_dev)):
            file_name, layout = spec.files[split][0]
            real = Path(glue_dir) / spec.name / file_name
            if real.exists():
                lines = real.read_text(encoding="utf-8").splitlines()[: n + (layout.header is not None)]
            else:
                lines = ["\t".join(layout.header)] if layout.header else []
                lines += [_fallback_row(spec, layout, i) for i in range(n)]
            (root / spec.name / file_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


FALLBACK_SENTENCES = [
    "A man with a hard hat is dancing.",
    "A young child is riding a horse.",
    "Herceptin was already approved to treat the sickest breast cancer patients.",
    "No Weapons of Mass Destruction Found in Iraq Yet.",
    "The cat sat on the mat, didn't it?",
    "Two dogs run through the park in the rain.",
]


def _fallback_row(spec, layout, i: int) -> str:
    cols = [str(i)] * layout.n_columns
    for k, col in enumerate(layout.text_columns):
        cols[col] = FALLBACK_SENTENCES[(i + 2 * k) % len(FALLBACK_SENTENCES)]
    cols[layout.label_column] = f"{(i * 0.7) % 5:.3f}" if spec.regression else spec.labels[i % len(spec.labels)]
    return "\t".join(cols)
