"""Tokenizers that turn text into space-separated fairseq tokens (GPT-2 BPE ids, SentencePiece pieces,
WordPiece tokens), each through its own library; parallel encoding over a process pool."""

from __future__ import annotations

import functools
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

TOKENIZERS = ("gpt2", "sentencepiece", "wordpiece")


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a tokenizer in a worker process (picklable)."""

    kind: str
    gpt2_encoder_json: str | None = None
    gpt2_vocab_bpe: str | None = None
    sentencepiece_model: str | None = None
    wordpiece_vocab: str | None = None
    wordpiece_cased: bool = False

    def validate(self):
        if self.kind not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.kind!r}")
        if self.kind == "gpt2":
            for flag, path in (
                ("--gpt2-encoder-json", self.gpt2_encoder_json),
                ("--gpt2-vocab-bpe", self.gpt2_vocab_bpe),
            ):
                if not path or not Path(path).is_file():
                    raise ValueError(f"--tokenizer gpt2 needs {flag} pointing to an existing file, got {path!r}")
        if self.kind == "wordpiece" and (not self.wordpiece_vocab or not Path(self.wordpiece_vocab).is_file()):
            raise ValueError(
                "--tokenizer wordpiece needs --wordpiece-vocab pointing to a BERT vocab.txt, "
                f"got {self.wordpiece_vocab!r}"
            )
        if self.kind == "sentencepiece" and self.sentencepiece_model and not Path(self.sentencepiece_model).is_file():
            raise ValueError(f"--sentencepiece-model: no such file {self.sentencepiece_model!r}")
        if self.kind == "sentencepiece" and not self.sentencepiece_model:
            return  # trained later on the train split
        flag = {
            "gpt2": "--gpt2-encoder-json/--gpt2-vocab-bpe",
            "sentencepiece": "--sentencepiece-model",
            "wordpiece": "--wordpiece-vocab",
        }[self.kind]
        try:
            self.build()
        except Exception as e:  # library errors (bad json, missing [SEP], ...) reported against the flag
            raise ValueError(f"{flag}: cannot load the {self.kind} tokenizer: {type(e).__name__}: {e}") from e

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}  # keys: the flag names

    @functools.lru_cache(maxsize=4)  # noqa: B019 (specs are few and immutable); keeps the BPE word cache
    def build(self):
        if self.kind == "gpt2":
            return _Gpt2(self.gpt2_encoder_json, self.gpt2_vocab_bpe)
        if self.kind == "sentencepiece":
            if not self.sentencepiece_model:
                raise ValueError("sentencepiece tokenizer has no model yet (train one with train_sentencepiece)")
            return _SentencePiece(self.sentencepiece_model)
        return _WordPiece(self.wordpiece_vocab, self.wordpiece_cased)


class _Gpt2:
    def __init__(self, encoder_json, vocab_bpe):
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        self.bpe = get_encoder(encoder_json, vocab_bpe)

    def encode_batch(self, texts):
        # BPE ids as strings, exactly like fairseq's examples/roberta/multiprocessing_bpe_encoder.py
        return [" ".join(map(str, self.bpe.encode(t))) for t in texts]


class _SentencePiece:
    def __init__(self, model):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model))

    def encode_batch(self, texts):
        return [" ".join(pieces) for pieces in self.sp.encode(list(texts), out_type=str)]


class _WordPiece:
    def __init__(self, vocab, cased):
        from tokenizers import BertWordPieceTokenizer

        self.tok = BertWordPieceTokenizer(str(vocab), lowercase=not cased)
        self.unk = "[UNK]"

    def encode_batch(self, texts):
        out = []
        for enc in self.tok.encode_batch(list(texts), add_special_tokens=False):
            # [UNK] becomes fairseq's own <unk> symbol (id 3), which a converted checkpoint maps to [UNK].
            out.append(" ".join("<unk>" if t == self.unk else t for t in enc.tokens))
        return out


def train_sentencepiece(texts, model_prefix: Path, vocab_size: int) -> Path:
    """Train a unigram SentencePiece model on `texts`; vocab_size is a soft limit (small tasks)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
    )
    return Path(f"{model_prefix}.model")


_worker_tokenizer = None


def _init_worker(spec: TokenizerSpec):
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per worker, no extra threads
    _worker_tokenizer = spec.build()


def _encode_chunk(texts):
    return _worker_tokenizer.encode_batch(texts)


def encode_all(spec: TokenizerSpec, texts, workers=1, chunk_size=2000):
    """Tokenize `texts` (order kept) with `workers` processes."""
    texts = list(texts)
    if workers <= 1 or len(texts) <= chunk_size:
        return spec.build().encode_batch(texts)
    out = []
    for part in encode_chunks(spec, texts, workers, chunk_size):
        out.extend(part)
    return out


def encode_chunks(spec: TokenizerSpec, texts, workers=1, chunk_size=2000):
    """Tokenize `texts` chunk by chunk (order kept), yielding one list of encoded lines per chunk, so a large
    corpus is never held tokenized in memory at once; `workers` processes when > 1."""
    chunks = (texts[i : i + chunk_size] for i in range(0, len(texts), chunk_size))
    if workers <= 1:
        tokenizer = spec.build()
        yield from (tokenizer.encode_batch(chunk) for chunk in chunks)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(_encode_chunk, chunks)
