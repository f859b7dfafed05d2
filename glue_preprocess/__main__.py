"""Command line: python -m glue_preprocess --glue-dir DIR --tasks RTE,MRPC --output-dir OUT --tokenizer gpt2 ..."""

from __future__ import annotations

import argparse
import sys

from .cli import run_preprocess
from .core import FORMATS, preprocess
from .tasks import TASKS, GlueFormatError
from .tokenization import TOKENIZERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glue_preprocess",
        description="Binarize GLUE tsv files for fairseq (sentence_prediction layout or multi-task text2text). "
        "See glue_preprocess/README.md.",
    )
    p.add_argument("--glue-dir", required=True, help="GLUE release folder (CoLA/, SST-2/, MRPC/, ...)")
    p.add_argument(
        "--tasks", required=True, help=f"comma-separated: {','.join(TASKS)}, or 'all' (every task folder present)"
    )
    p.add_argument("--output-dir", required=True, help="writes <TASK>-bin/ or text2text-bin/ here")
    p.add_argument("--tokenizer", required=True, choices=TOKENIZERS)
    p.add_argument("--format", default="sentence_prediction", choices=FORMATS)
    p.add_argument("--srcdict", help="fairseq dict.txt of the pretrained model (ids then match the checkpoint)")
    p.add_argument("--gpt2-encoder-json", help="GPT-2 BPE encoder.json (--tokenizer gpt2)")
    p.add_argument("--gpt2-vocab-bpe", help="GPT-2 BPE vocab.bpe (--tokenizer gpt2)")
    p.add_argument("--sentencepiece-model", help="SentencePiece .model; trained on the train split(s) when absent")
    p.add_argument("--sentencepiece-vocab-size", type=int, default=8000, help="when training one (soft limit)")
    p.add_argument("--wordpiece-vocab", help="BERT vocab.txt (--tokenizer wordpiece)")
    p.add_argument("--wordpiece-cased", action="store_true", help="do not lowercase (cased BERT vocabularies)")
    p.add_argument("--train-subset-size", type=int, default=None, help="keep N random train rows per task")
    p.add_argument("--subset-seed", type=int, default=1, help="seed of --train-subset-size and --dev-from-train")
    p.add_argument(
        "--dev-from-train",
        type=int,
        default=0,
        help="carve N train rows as the valid split; GLUE dev becomes the labelled test split",
    )
    p.add_argument("--workers", type=int, default=1, help="processes for tokenization and binarization")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument(
        "--allow-missing-splits",
        action="store_true",
        help="binarize a task whose train or dev file is missing (default: an error naming the file)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_preprocess("glue_preprocess", preprocess, vars(args), GlueFormatError)


if __name__ == "__main__":
    sys.exit(main())
