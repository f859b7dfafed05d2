"""Summarisation and XNLI releases -> binarized fairseq data (`python -m seq2seq_preprocess`); see README.md.

Datasets live in a table (`registry`): one module per release in `seq2seq_preprocess/datasets/`, each
ending with `register(Dataset(...))`; `all_datasets()` lists them, `examples(...)` parses one split.
"""

from .core import TOKENIZERS, examples, preprocess, read_dataset
from .records import Example, Seq2SeqFormatError, SplitData
from .registry import Dataset, Format, Generation, ReadOptions, all_datasets, get_dataset, register

__all__ = [
    "preprocess",
    "read_dataset",
    "examples",
    "all_datasets",
    "get_dataset",
    "register",
    "Dataset",
    "Format",
    "Generation",
    "ReadOptions",
    "Example",
    "SplitData",
    "Seq2SeqFormatError",
    "TOKENIZERS",
]
