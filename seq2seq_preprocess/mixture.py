"""The Hyperdecoders summarisation + NLI mixture as one text-to-text multi-task folder for BART
(`python -m seq2seq_preprocess.mixture`), the reference's `configs/xsum_nli/summarise_nli.json`: XSum, CNN/DM,
WikiLingua (English), ANLI (R1-R3), aNLI (ART) and, when given, MNLI.

Sources and targets as the reference casts them (allenai/hyperdecoders `data/tasks.py`): summaries
`summarize: {document}` -> summary (all three datasets share the prefix, so the input carries no task
identity), NLI as in `nli_text2text.py`. Each release is read by this package's reader (the dataset table for
xsum / cnn_dm / wikilingua / anli, `nli_text2text.read_art`, `glue_preprocess` for MNLI).

Splits (reference `split_validation_test=true`, `n_val` 1600, seed 42; datasets.md §8c):
- `train`: every task's train split, concatenated (the reference's size-proportional mixture);
- `valid_<task>`: the task's dev split, `--n-val` examples of a seed-42 `torch.randperm` (all with 0);
  ART: `--art-valid-from-train` rows carved from its train split the same way (the reference's 1,000 for its
  "large datasets without all splits"), and its dev split becomes `test_art`; MNLI: dev mismatched;
- `test_<task>`: the task's test split (MNLI: dev matched; ART: see above; none when the release has none).

Output `OUT/mixture-bin/`: fairseq translation layout (languages source/target, one joint dictionary), per
split `<split>.task` (task name per example) and `<split>.ref.jsonl` (id and the ROUGE reference / target),
`tasks.json` (per task: kind, metrics, labels, decoding settings, splits) and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glue_preprocess.core import atomic_dir
from glue_preprocess.tokenization import TokenizerSpec

from .core import SOURCE_LANG, TARGET_LANG, _summarization, read_dataset
from .mrqa import run_cli
from .nli_text2text import NLI_CASTS, read_art
from .records import Example, SplitData
from .registry import ReadOptions, get_dataset

SUMMARIZATION = ("xsum", "cnn_dm", "wikilingua")
TASKS = (*SUMMARIZATION, "anli", "art", "mnli")
SUMMARY_PREFIX = "summarize: "  # reference tasks.py L1098-1162
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# the reference decodes class answers greedily with max_length = the longest label (a digit here)
CLASS_GENERATION = {"beam": 1, "lenpen": 1.0, "max_len_b": 4, "min_len": 1, "no_repeat_ngram_size": 0}
REFERENCE_SEED = 42


@dataclass(frozen=True)
class MixtureOptions:
    n_val: int = 1600
    art_valid_from_train: int = 1000
    max_rows: int | None = None
    skip_bad_rows: bool = False


def seeded_subset(n: int, k: int, seed: int = REFERENCE_SEED) -> list[int]:
    """The first k of a seeded `torch.randperm(n)` (the reference's `get_shuffled_sampled_split`), file order."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def _read_mnli(glue_dir: Path, options: MixtureOptions) -> dict[str, SplitData]:
    from glue_preprocess.tasks import read_split

    def split(name, parsed):
        examples = [Example(ex.texts, ex.label, f"MNLI:{ex.line}") for ex in parsed]
        return SplitData(name, examples, rows_read=len(examples))

    train = read_split(glue_dir, "MNLI", "train", options.skip_bad_rows)[0]
    matched, mismatched = read_split(glue_dir, "MNLI", "valid", options.skip_bad_rows)[:2]
    # reference tasks.py L683-692: validation = mismatched, test = matched
    return {"train": split("train", train), "valid": split("valid", mismatched), "test": split("test", matched)}


def read_task(task: str, input_dir: Path, options: MixtureOptions) -> dict[str, SplitData]:
    """{train, valid, test} of one task's release, casts not yet applied."""
    if task == "art":
        return read_art(input_dir, ReadOptions(skip_bad_rows=options.skip_bad_rows))
    if task == "mnli":
        return _read_mnli(input_dir, options)
    _, _, splits = read_dataset(task, input_dir, skip_bad_rows=options.skip_bad_rows)
    return splits


def cast(task: str, example: Example) -> Example:
    """The example as the reference's text-to-text pair; `reference` keeps the ROUGE reference (summaries)."""
    if task in SUMMARIZATION:
        return Example((SUMMARY_PREFIX + example.texts[0],), example.target, example.where, example.id, example.ref)
    source, target = NLI_CASTS[task][0](example)
    return Example((source,), target, example.where, example.id)


def task_splits(task: str, splits: dict[str, SplitData], options: MixtureOptions) -> dict[str, list[Example]]:
    """{"train", "valid", "test"} example lists of one task after the reference's split rules."""
    out = {name: list(data.examples) for name, data in splits.items() if name in ("train", "valid", "test")}
    if task == "art" and options.art_valid_from_train:
        carved = set(seeded_subset(len(out["train"]), options.art_valid_from_train))
        out["test"] = out.pop("valid", [])
        out["valid"] = [ex for i, ex in enumerate(out["train"]) if i in carved]
        out["train"] = [ex for i, ex in enumerate(out["train"]) if i not in carved]
    elif options.n_val and "valid" in out:
        out["valid"] = [out["valid"][i] for i in seeded_subset(len(out["valid"]), options.n_val)]
    if options.max_rows:
        out = {name: examples[: options.max_rows] for name, examples in out.items()}
    return {name: examples for name, examples in out.items() if examples}


def task_info(task: str, names: dict[str, list[str]]) -> dict:
    if task in SUMMARIZATION:
        generation = get_dataset(task).generation
        assert generation is not None
        decoding = {k: v for k, v in generation.__dict__.items() if k != "source"}
        return {"kind": "summarization", "metrics": list(ROUGE_METRICS), "generation": decoding, **names}
    labels = list(NLI_CASTS[task][1])
    return {
        "kind": "classification",
        "metrics": ["accuracy"],
        "labels": labels,
        "generation": CLASS_GENERATION,
        **names,
    }


def preprocess(
    output_dir,
    *,
    gpt2_encoder_json: str,
    gpt2_vocab_bpe: str,
    srcdict: str | None = None,
    xsum: str | None = None,
    cnn_dm: str | None = None,
    wikilingua: str | None = None,
    anli: str | None = None,
    art: str | None = None,
    mnli: str | None = None,
    n_val: int = 1600,
    art_valid_from_train: int = 1000,
    max_rows: int | None = None,
    workers: int = 1,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Write OUT/mixture-bin/ from the task folders given (at least one); returns its summary."""
    given = {"xsum": xsum, "cnn_dm": cnn_dm, "wikilingua": wikilingua, "anli": anli, "art": art, "mnli": mnli}
    inputs = {task: Path(path) for task, path in given.items() if path}
    if not inputs:
        raise ValueError("give at least one task folder: --xsum, --cnn-dm, --wikilingua, --anli, --art, --mnli")
    for flag, value in (("--n-val", n_val), ("--art-valid-from-train", art_valid_from_train), ("--workers", workers)):
        if value < (1 if flag == "--workers" else 0):
            raise ValueError(f"{flag} must be {'>= 1' if flag == '--workers' else '>= 0'}, got {value}")
    tok = TokenizerSpec("gpt2", gpt2_encoder_json=gpt2_encoder_json, gpt2_vocab_bpe=gpt2_vocab_bpe)
    tok.validate()
    options = MixtureOptions(n_val, art_valid_from_train, max_rows, skip_bad_rows)
    t0 = time.time()
    per_task = {task: task_splits(task, read_task(task, path, options), options) for task, path in inputs.items()}
    splits: dict[str, SplitData] = {"train": SplitData("train")}
    tasks_of: dict[str, list[str]] = {"train": []}
    for task, parts in per_task.items():
        for part, examples in parts.items():
            name = "train" if part == "train" else f"{part}_{task}"
            splits.setdefault(name, SplitData(name)).examples.extend(cast(task, ex) for ex in examples)
            tasks_of.setdefault(name, []).extend([task] * len(examples))
    splits = {name: data for name, data in splits.items() if data.examples}
    final = Path(output_dir) / "mixture-bin"
    with atomic_dir(final, overwrite) as tmp:
        binarized = _summarization(splits, tok, tmp, srcdict, workers)
        for name in splits:
            (tmp / f"{name}.task").write_text("".join(t + "\n" for t in tasks_of[name]), encoding="utf-8")
        tasks_json = {
            "format": "text2text_mixture",
            "source_lang": SOURCE_LANG,
            "target_lang": TARGET_LANG,
            "tokenizer": tok.describe(),
            "tasks": {
                task: task_info(
                    task,
                    {
                        "valid_splits": [f"valid_{task}"] if "valid" in per_task[task] else [],
                        "test_splits": [f"test_{task}"] if "test" in per_task[task] else [],
                    },
                )
                for task in per_task
            },
            "splits": {name: len(data.examples) for name, data in splits.items()},
        }
        summary = {
            "dataset": "mixture",
            "output": str(final.resolve()),
            "inputs": {task: str(path.resolve()) for task, path in inputs.items()},
            "options": options.__dict__,
            "tokenizer": tok.describe(),
            "splits": {name: {t: tasks_of[name].count(t) for t in per_task} for name in splits},
            "binarized": binarized,
            "seconds": round(time.time() - t0, 3),
        }
        (tmp / "tasks.json").write_text(json.dumps(tasks_json, indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"[mixture] -> {summary['output']}"]
    for name, counts in summary["splits"].items():
        lines.append(f"  {name:<18} " + "  ".join(f"{t} {n}" for t, n in counts.items() if n))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seq2seq_preprocess.mixture", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="writes mixture-bin/ here")
    p.add_argument("--gpt2-encoder-json", required=True)
    p.add_argument("--gpt2-vocab-bpe", required=True)
    p.add_argument("--srcdict", help="BART's dict.txt (ids then match the checkpoint)")
    for task in TASKS:
        what = "GLUE folder with MNLI/" if task == "mnli" else "release folder (python -m seq2seq_preprocess --help)"
        p.add_argument(f"--{task.replace('_', '-')}", help=f"{task}: {what}")
    p.add_argument("--n-val", type=int, default=1600, help="dev examples kept per task (seed 42; 0 = all)")
    p.add_argument("--art-valid-from-train", type=int, default=1000, help="ART rows carved from train as valid_art")
    p.add_argument("--max-rows", type=int, help="first N examples of each split (smoke runs)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("seq2seq_preprocess.mixture", lambda: preprocess(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())
