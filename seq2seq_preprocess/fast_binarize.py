"""Binarization straight from tokenizer ids: the same bytes as fairseq's FileBinarizer over token files, faster.

fairseq's path (glue_preprocess.core.binarize, as `fairseq-preprocess`) writes every example as a line of
tokens, then parses it again in Python with `Dictionary.encode_line`, one tensor element at a time; for CNN/DM
(287k articles of ~900 GPT-2 tokens) that alone takes many minutes. When the model's dictionary is given,
every tokenizer id maps to one fixed fairseq index, so here:
  * GPT-2 BPE is fairseq's own `gpt2_bpe_utils.Encoder` (same regex, same `bpe()` merges, same ids), its ids
    cached per space-separated word (`IdEncoder._gpt2` says why that is exact); sentencepiece is its C++
    batch encoder;
  * a lookup table maps tokenizer ids to fairseq indices in numpy (symbol = the GPT-2 id as a decimal string,
    or the sentencepiece piece; `Dictionary.index`, so an id missing from the dictionary becomes <unk>);
  * chunks of texts go to `workers` forked processes; fairseq's own `MMapIndexedDatasetBuilder` (dtype from
    `make_builder`, </s> appended) writes the items in order.
tests/test_seq2seq_preprocess.py checks the output byte for byte against the FileBinarizer path.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from glue_preprocess.tokenization import TokenizerSpec

CHUNK = 500  # texts per worker task


class IdEncoder:
    """texts -> lists of tokenizer ids, and the symbol of each id (what fairseq's dict.txt lists)."""

    def __init__(self, spec: TokenizerSpec):
        self.kind = spec.kind
        if spec.kind == "gpt2":
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            self.bpe = get_encoder(spec.gpt2_encoder_json, spec.gpt2_vocab_bpe)
            self.cache: dict[str, list[int]] = {}  # first word of a text -> its ids
            self.space_cache: dict[str, list[int]] = {}  # later word w -> ids of " " + w
            self.symbols = [str(i) for i in range(max(self.bpe.encoder.values()) + 1)]  # BART's dict.txt: ids
        elif spec.kind == "sentencepiece":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(spec.sentencepiece_model))
            self.symbols = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        else:
            raise ValueError(f"no fast binarizer for tokenizer {spec.kind!r}")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.sp.encode(list(texts), out_type=int)
        return [self._gpt2(text) for text in texts]

    def _pieces(self, text: str) -> list[int]:
        """fairseq's Encoder.encode (gpt2_bpe_utils.py) of `text`, exactly."""
        bpe, out = self.bpe, []
        for token in bpe.re.findall(bpe.pat, text):
            word = "".join(bpe.byte_encoder[b] for b in token.encode("utf-8"))
            out += [bpe.encoder[piece] for piece in bpe.bpe(word).split(" ")]
        return out

    def _gpt2(self, text: str) -> list[int]:
        """fairseq's Encoder.encode, memoised per space-separated word.

        When the only whitespace is single ASCII spaces (`isprintable()`: no other separator or control
        character; no "  "), GPT-2's pre-tokenizer regex never matches across a space: each alternative takes
        at most one leading space and the non-space run after it (`'s`, ` ?\\p{L}+`, ` ?\\p{N}+`,
        ` ?[^\\s\\p{L}\\p{N}]+`), and `\\s+(?!\\S)` matches a lone space only at the end. So the ids of the
        text are the concatenation of the ids of its first word and of " " + each later word, which are
        cached. Any other text goes through the regex as a whole."""
        if not text.isprintable() or "  " in text:
            return self._pieces(text)
        words = text.split(" ")
        # ids of the first word, then of " " + each later word (the later words' cache is keyed by the bare
        # word: no string concatenation per word)
        parts: list[list[int] | None] = [
            self.cache.get(words[0]),
            *map(self.space_cache.get, itertools.islice(words, 1, None)),
        ]
        if None in parts:
            for i, ids in enumerate(parts):
                if ids is None:
                    cache, key = (self.cache, words[0]) if i == 0 else (self.space_cache, words[i])
                    parts[i] = cache[key] = self._pieces(key if i == 0 else " " + key)
        return list(itertools.chain.from_iterable(parts))  # type: ignore[arg-type]  # no None is left


def lookup_table(encoder: IdEncoder, dictionary) -> np.ndarray:
    """fairseq index of every tokenizer id (Dictionary.index: <unk> when the dictionary lacks the symbol)."""
    return np.array([dictionary.index(sym) for sym in encoder.symbols], dtype=np.int64)


_state: tuple | None = None  # (IdEncoder, lookup table, eos) of this process


def _init(spec: TokenizerSpec, table: np.ndarray, eos: int) -> None:
    global _state
    _state = (IdEncoder(spec), table, eos)


def _map_chunk(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(item lengths incl. </s>, all items' fairseq indices concatenated) of a chunk of texts."""
    assert _state is not None
    encoder, table, eos = _state
    seqs = encoder.encode(texts)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    flat = np.insert(table[ids], np.cumsum(lengths), eos)  # </s> after each item
    return lengths + 1, flat


class FastBinarizer:
    """Binarizes text lists with one tokenizer and dictionary; `workers` > 1 = a pool of forked processes
    (kept across calls, so each worker's BPE cache warms up once)."""

    def __init__(self, spec: TokenizerSpec, dictionary, workers: int = 1):
        self.dictionary = dictionary
        self.table = lookup_table(IdEncoder(spec), dictionary)
        self.args = (spec, self.table, dictionary.eos())
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init, initargs=self.args)
        else:
            _init(*self.args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def _chunks(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunks = (texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK))
        if self.pool is None:
            return map(_map_chunk, chunks)
        return self.pool.imap(_map_chunk, chunks)

    def binarize(self, texts: Sequence[str], out_prefix: Path) -> dict:
        """`out_prefix`.bin/.idx, one item per text; FileBinarizer's statistics (sequences, tokens incl.
        </s>, tokens that became <unk>: sentencepiece writes an unknown character as itself, so it is the
        dictionary lookup that turns it into <unk>, as in fairseq's path)."""
        import torch
        from fairseq.data import indexed_dataset

        builder = indexed_dataset.make_builder(f"{out_prefix}.bin", impl="mmap", vocab_size=len(self.dictionary))
        n_tok = n_unk = 0
        for lengths, flat in self._chunks(texts):
            n_tok += len(flat)
            n_unk += int((flat == self.dictionary.unk()).sum())
            start = 0
            for length in lengths.tolist():
                builder.add_item(torch.from_numpy(flat[start : start + length]))
                start += length
        builder.finalize(f"{out_prefix}.idx")
        return {
            "sequences": len(texts),
            "tokens": n_tok,
            "unk_replaced": n_unk,
            "unk_percent": round(100.0 * n_unk / n_tok if n_tok else 0.0, 4),
        }
