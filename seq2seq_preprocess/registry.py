"""The dataset table: one `Dataset` per release, registered by its module in `seq2seq_preprocess/datasets/`.

A new dataset is one module in `seq2seq_preprocess/datasets/` that ends with `register(Dataset(...))`;
every module of that folder is imported on first use of the table, so nothing else needs editing.

A `Dataset` says what kind of output it makes (`summarization`: fairseq's translation layout with
`source`/`target` languages, as BART's summarisation recipe; `classification`: fairseq's sentence-prediction
layout `input0/ input1/ label/`), which on-disk formats of the release it reads (`Format`: how to recognise
the folder, how to read it into splits), where users download it, and, for summarisation, BART's decoding
settings for it (datasets.md §9c).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .records import SplitData

KINDS = ("summarization", "classification")


@dataclass(frozen=True)
class ReadOptions:
    """What every reader gets besides the input folder."""

    skip_bad_rows: bool = False
    seed: int = 1  # splits a release without official splits (Reddit TIFU)
    languages: tuple[str, ...] = ()  # XNLI: languages to write (empty = all 15)


# A reader returns the dataset's splits in fairseq order: {"train": SplitData, "valid": ..., "test": ...}
Reader = Callable[[Path, ReadOptions], "dict[str, SplitData]"]


@dataclass(frozen=True)
class Format:
    name: str  # "stories", "jsonl", ...
    files: str  # what --input-dir must hold (help text and errors)
    detect: Callable[[Path], bool]  # does this folder look like this format?
    read: Reader


@dataclass(frozen=True)
class Generation:
    """BART's decoding settings (fairseq examples/bart/summarize.py L10-11; lengths in GPT-2 BPE tokens)."""

    beam: int
    lenpen: float
    max_len_b: int
    min_len: int
    no_repeat_ngram_size: int
    source: str  # where the settings come from (or why we chose them where none were published)

    def fairseq_flags(self) -> list[str]:
        return [
            "--beam",
            str(self.beam),
            "--lenpen",
            str(self.lenpen),
            "--max-len-b",
            str(self.max_len_b),
            "--min-len",
            str(self.min_len),
            "--no-repeat-ngram-size",
            str(self.no_repeat_ngram_size),
        ]


CNN_KWARGS = Generation(4, 2.0, 140, 55, 3, "fairseq examples/bart/summarize.py L10 CNN_KWARGS")
XSUM_KWARGS = Generation(6, 1.0, 60, 10, 3, "fairseq examples/bart/summarize.py L11 XSUM_KWARGS")


@dataclass(frozen=True)
class Dataset:
    name: str  # the --dataset value
    kind: str  # summarization | classification
    formats: tuple[Format, ...]  # tried in order by auto-detection
    download: str  # where users get the release (README text)
    description: str
    generation: Generation | None = None  # summarisation: decoding settings for fairseq-generate
    labels: tuple[str, ...] | None = None  # classification: class id order
    aliases: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)  # dataset facts a consumer may need

    def format(self, name: str | None, input_dir: Path) -> Format:
        """The format called `name`, or the first whose files are in input_dir (ValueError naming the flag)."""
        if name:
            for fmt in self.formats:
                if fmt.name == name:
                    return fmt
            raise ValueError(
                f"--format {name!r} is not a format of {self.name}; known: {', '.join(f.name for f in self.formats)}"
            )
        for fmt in self.formats:
            if fmt.detect(input_dir):
                return fmt
        expected = "; ".join(f"{f.name}: {f.files}" for f in self.formats)
        raise ValueError(f"--input-dir {input_dir}: no {self.name} release found there (expected {expected})")


_DATASETS: dict[str, Dataset] = {}
_loaded = False


def register(dataset: Dataset) -> Dataset:
    """Add a dataset to the table (at import of its module). Names and aliases must be unique."""
    if dataset.kind not in KINDS:
        raise ValueError(f"dataset {dataset.name}: kind must be one of {KINDS}, got {dataset.kind!r}")
    for key in (dataset.name, *dataset.aliases):
        if key in _DATASETS and _DATASETS[key].name != dataset.name:
            raise ValueError(f"dataset name {key!r} is registered twice ({_DATASETS[key].name}, {dataset.name})")
        _DATASETS[key] = dataset
    return dataset


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import datasets as package

    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        importlib.import_module(f"{package.__name__}.{module}")


def all_datasets() -> dict[str, Dataset]:
    """name -> Dataset, every registered dataset (aliases left out), in name order."""
    _load_all()
    return {name: _DATASETS[name] for name in sorted({d.name for d in _DATASETS.values()})}


def get_dataset(name: str) -> Dataset:
    """The dataset called `name` (case-insensitive, aliases too); ValueError naming --dataset."""
    _load_all()
    dataset = _DATASETS.get(name) or _DATASETS.get(name.lower().replace("-", "_"))
    if dataset is None:
        raise ValueError(f"--dataset {name!r} is unknown; known: {', '.join(all_datasets())}")
    return dataset
