"""Command line: python -m seq2seq_preprocess --dataset cnn_dm --input-dir DIR --output-dir OUT --tokenizer gpt2 ..."""

from __future__ import annotations

import argparse
import sys

from glue_preprocess.cli import run_preprocess

from .core import TOKENIZERS, preprocess
from .records import Seq2SeqFormatError
from .registry import all_datasets


def build_parser() -> argparse.ArgumentParser:
    table = all_datasets()
    p = argparse.ArgumentParser(
        prog="python -m seq2seq_preprocess",
        description="Binarize a summarisation or XNLI release for fairseq. See seq2seq_preprocess/README.md.",
        epilog="datasets and their formats:\n"
        + "\n".join(f"  {d.name}: " + "; ".join(f"{f.name} ({f.files})" for f in d.formats) for d in table.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help=", ".join(table))
    p.add_argument("--input-dir", required=True, help="the release folder as downloaded (see README)")
    p.add_argument("--output-dir", required=True, help="writes <dataset>-bin/ here")
    p.add_argument("--tokenizer", required=True, choices=TOKENIZERS, help="gpt2 for BART, sentencepiece for XLM-R")
    p.add_argument("--format", help="one of the dataset's formats; default: detected from the files")
    p.add_argument("--srcdict", help="the pretrained model's dict.txt (BART's or XLM-R's); ids then match it")
    p.add_argument("--gpt2-encoder-json", help="GPT-2 BPE encoder.json (--tokenizer gpt2)")
    p.add_argument("--gpt2-vocab-bpe", help="GPT-2 BPE vocab.bpe (--tokenizer gpt2)")
    p.add_argument("--sentencepiece-model", help="XLM-R's sentencepiece.bpe.model (--tokenizer sentencepiece)")
    p.add_argument("--splits", help="comma list of splits to write (default: all the release has)")
    p.add_argument("--languages", help="XNLI: comma list of languages (default: all 15)")
    p.add_argument("--seed", type=int, default=1, help="seed of the split of a release without one (Reddit TIFU)")
    p.add_argument("--max-rows", type=int, help="keep the first N rows of each split (smoke runs)")
    p.add_argument("--workers", type=int, default=1, help="processes for tokenization and binarization")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <dataset>-bin/")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_preprocess("seq2seq_preprocess", preprocess, vars(args), Seq2SeqFormatError)


if __name__ == "__main__":
    sys.exit(main())
