"""A dataset release -> binarized fairseq data: read (registry), tokenize (GPT-2 BPE ids or sentencepiece
pieces, in worker processes), map to the pretrained model's dictionary and binarize with fairseq's own
binarizer, all inside a temp folder renamed into place at the end (robustft_common.atomic_files.atomic_dir)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from glue_preprocess.core import binarize, build_fairseq_dict
from glue_preprocess.tokenization import TokenizerSpec, encode_chunks
from robustft_common.atomic_files import atomic_dir

from .fast_binarize import FastBinarizer
from .records import Example, SplitData
from .registry import Dataset, ReadOptions, get_dataset

TOKENIZERS = ("gpt2", "sentencepiece")
SOURCE_LANG, TARGET_LANG = "source", "target"  # BART's summarisation recipe (--source-lang source ...)


def _encode_to_file(tok: TokenizerSpec, texts: list[str], path: Path, workers: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for part in encode_chunks(tok, texts, workers, chunk_size=1000):
            f.write("".join(line + "\n" for line in part))


def _write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def _load_dict(path: Path):
    from fairseq.data import Dictionary

    return Dictionary.load(str(path))


# A job: (name in summary.json, texts, output prefix). `train` names the jobs a dictionary is built from.
Job = tuple[str, list[str], Path]


def _binarize_jobs(jobs: list[Job], train: list[str], tok, tmp: Path, srcdict, workers) -> tuple[Path, dict]:
    """Binarize every job with one dictionary; returns (dict.txt path, statistics per job).

    With the model's dict.txt (--srcdict, the real use: ids must match the checkpoint) the fast binarizer
    writes directly from tokenizer ids (fast_binarize.py: the same bytes as fairseq's). Without one, the
    dictionary is built from the train token files the way fairseq-preprocess builds it, and fairseq's
    FileBinarizer reads those files (tests, models trained from scratch)."""
    raw = tmp / ".raw"
    raw.mkdir()
    dict_path = raw / "dict.txt"
    stats = {}
    if srcdict:
        shutil.copyfile(srcdict, dict_path)
        with FastBinarizer(tok, _load_dict(dict_path), workers) as binarizer:
            for name, texts, prefix in jobs:
                stats[name] = binarizer.binarize(texts, prefix)
        return dict_path, stats
    for name, texts, _ in jobs:
        _encode_to_file(tok, texts, raw / name.replace("/", "."), workers)
    train_files = [raw / name.replace("/", ".") for name in train]
    if not train_files:
        raise ValueError("no train split to build a dictionary from; pass --srcdict (the model's dict.txt)")
    build_fairseq_dict(train_files, dict_path, workers)
    dictionary = _load_dict(dict_path)
    for name, _, prefix in jobs:
        stats[name] = binarize(raw / name.replace("/", "."), dictionary, prefix, workers)
    return dict_path, stats


# ------------------------------------------------------------------------------------------ layouts
def _summarization(splits: dict[str, SplitData], tok, tmp: Path, srcdict, workers) -> dict:
    """fairseq translation layout with languages source/target (BART's summarisation recipe), plus per
    split `<split>.ref.jsonl`: id and ROUGE reference (sentences separated by "\\n" where the release has them)."""
    jobs: list[Job] = []
    for name, data in splits.items():
        for lang, texts in (
            (SOURCE_LANG, [ex.texts[0] for ex in data.examples]),
            (TARGET_LANG, [ex.target for ex in data.examples]),
        ):
            jobs.append((f"{name}.{lang}", texts, tmp / f"{name}.{SOURCE_LANG}-{TARGET_LANG}.{lang}"))
        _write_lines(tmp / f"{name}.ref.jsonl", (json.dumps({"id": ex.id, "ref": ex.ref}) for ex in data.examples))
    train = [f"train.{lang}" for lang in (SOURCE_LANG, TARGET_LANG) if "train" in splits]
    dict_path, stats = _binarize_jobs(jobs, train, tok, tmp, srcdict, workers)
    for lang in (SOURCE_LANG, TARGET_LANG):
        shutil.copyfile(dict_path, tmp / f"dict.{lang}.txt")  # one joint dictionary (BART shares embeddings)
    shutil.rmtree(tmp / ".raw")
    return stats


def _classification(dataset: Dataset, splits: dict[str, SplitData], tok, tmp: Path, srcdict, workers) -> dict:
    """fairseq's sentence-prediction layout (input0/ input1/ label/), like glue_preprocess; the label
    dictionary lists the labels in the dataset's class-id order."""
    assert dataset.labels is not None
    n_inputs = len(next(ex for d in splits.values() for ex in d.examples).texts)
    inputs = [f"input{i}" for i in range(n_inputs)]
    for col in [*inputs, "label"]:
        (tmp / col).mkdir()
    jobs: list[Job] = [
        (f"{col}/{name}", [ex.texts[i] for ex in data.examples], tmp / col / name)
        for name, data in splits.items()
        for i, col in enumerate(inputs)
    ]
    train = [f"{col}/train" for col in inputs if "train" in splits]
    dict_path, stats = _binarize_jobs(jobs, train, tok, tmp, srcdict, workers)
    for col in inputs:  # sentence_prediction reads input0/dict.txt for every input
        shutil.copyfile(dict_path, tmp / col / "dict.txt")
    counts = {lab: 0 for lab in dataset.labels}
    for ex in splits["train"].examples if "train" in splits else []:
        counts[ex.target] += 1
    _write_lines(tmp / "label" / "dict.txt", (f"{lab} {counts[lab]}" for lab in dataset.labels))
    label_dict = _load_dict(tmp / "label" / "dict.txt")
    raw = tmp / ".raw"
    for name, data in splits.items():
        _write_lines(raw / f"{name}.label", (ex.target for ex in data.examples))
        stats[f"label/{name}"] = binarize(raw / f"{name}.label", label_dict, tmp / "label" / name, 1)
    shutil.rmtree(raw)
    return stats


# ------------------------------------------------------------------------------------------ public API
def read_dataset(dataset: str, input_dir, *, format: str | None = None, **options) -> tuple[Dataset, str, dict]:
    """(Dataset, format name, {split: SplitData}) of a release folder; no tokenization."""
    spec = get_dataset(dataset)
    root = Path(input_dir)
    if not root.is_dir():
        raise ValueError(f"--input-dir {root} is not a directory")
    fmt = spec.format(format, root)
    splits = fmt.read(root, ReadOptions(**options))
    return spec, fmt.name, splits


def preprocess(
    dataset: str,
    input_dir,
    output_dir,
    tokenizer: str,
    *,
    format: str | None = None,
    srcdict: str | None = None,
    gpt2_encoder_json: str | None = None,
    gpt2_vocab_bpe: str | None = None,
    sentencepiece_model: str | None = None,
    splits: str | list[str] | None = None,
    languages: str | list[str] | None = None,
    seed: int = 1,
    max_rows: int | None = None,
    workers: int = 1,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Binarize one dataset into OUT/<dataset>-bin/; returns (and writes) its summary. See README.md."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if tokenizer == "sentencepiece" and not sentencepiece_model:
        raise ValueError("--tokenizer sentencepiece needs --sentencepiece-model (XLM-R's sentencepiece.bpe.model)")
    if srcdict and not Path(srcdict).is_file():
        raise ValueError(f"--srcdict: no such file {srcdict!r}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {max_rows}")
    tok = TokenizerSpec(
        tokenizer,
        gpt2_encoder_json=gpt2_encoder_json,
        gpt2_vocab_bpe=gpt2_vocab_bpe,
        sentencepiece_model=sentencepiece_model,
    )
    tok.validate()
    languages = [x for x in languages.split(",") if x] if isinstance(languages, str) else list(languages or [])
    t0 = time.time()
    spec, fmt, data = read_dataset(
        dataset, input_dir, format=format, skip_bad_rows=skip_bad_rows, seed=seed, languages=tuple(languages)
    )
    read_s = time.time() - t0
    if splits:
        wanted = [s for s in splits.split(",") if s] if isinstance(splits, str) else list(splits)
        unknown = [s for s in wanted if s not in data]
        if unknown:
            raise ValueError(f"--splits {','.join(unknown)}: not in this release; it has {', '.join(data)}")
        data = {name: data[name] for name in wanted}
    if max_rows:
        for d in data.values():
            del d.examples[max_rows:]
    written = {name: d for name, d in data.items() if d.examples}
    if not written:
        raise ValueError(f"{input_dir}: no rows to write (summary of what was read: {_split_infos(data)})")

    final = Path(output_dir) / f"{spec.name}-bin"
    with atomic_dir(final, overwrite) as tmp:
        t1 = time.time()
        if spec.kind == "summarization":
            stats = _summarization(written, tok, tmp, srcdict, workers)
        else:
            stats = _classification(spec, written, tok, tmp, srcdict, workers)
        summary = {
            "dataset": spec.name,
            "kind": spec.kind,
            "format": fmt,
            "input_dir": str(Path(input_dir).resolve()),
            "output": str(final.resolve()),
            "tokenizer": tok.describe(),
            "srcdict": str(Path(srcdict).resolve()) if srcdict else None,
            "layout": _layout(spec),
            "generation": _generation(spec),
            "labels": list(spec.labels) if spec.labels else None,
            "splits": _split_infos(data),
            "binarized": stats,
            "binarizer": "fast (tokenizer ids -> --srcdict)" if srcdict else "fairseq FileBinarizer",
            "rows_written": sum(len(d.examples) for d in written.values()),
            "read_seconds": round(read_s, 3),
            "tokenize_and_binarize_seconds": round(time.time() - t1, 3),
            "workers": workers,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(format_summary(summary))
    return summary


def _split_infos(data: dict[str, SplitData]) -> dict:
    return {name: d.info() for name, d in data.items()}


def _layout(spec: Dataset) -> dict:
    if spec.kind == "summarization":
        return {"task": "translation", "source_lang": SOURCE_LANG, "target_lang": TARGET_LANG}
    return {"task": "sentence_prediction", "num_classes": len(spec.labels or ()), "init_token": 0, "separator_token": 2}


def _generation(spec: Dataset) -> dict | None:
    if spec.generation is None:
        return None
    return {**spec.generation.__dict__, "flags": spec.generation.fairseq_flags()}


def format_summary(summary: dict) -> str:
    lines = [f"[{summary['dataset']} / {summary['format']}] -> {summary['output']}"]
    for name, info in summary["splits"].items():
        extra = "".join(f"  dropped {n} ({why})" for why, n in info["dropped"].items())
        extra += "".join(f"  changed {n} ({why})" for why, n in info["changed"].items())
        lines.append(
            f"  {name:<10} read {info['rows_read']:>8}  written {info['rows_written']:>8}  "
            f"skipped {info['rows_skipped']:>5}{extra}"
        )
        for reason in info["skipped_examples"][:3]:
            lines.append(f"      skipped {reason}")
    return "\n".join(lines)


def examples(dataset: str, input_dir, split: str = "train", **options) -> list[Example]:
    """The parsed examples of one split (no tokenization): `examples("xsum", "XSum/", "test")`."""
    _, _, data = read_dataset(dataset, input_dir, **options)
    if split not in data:
        raise ValueError(f"split {split!r} not in this release; it has {', '.join(data)}")
    return data[split].examples
