"""GLUE -> binarized fairseq data: sentence-prediction (RoBERTa GLUE layout) and text-to-text."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from robustft_common.atomic_files import atomic_dir

from .tasks import TASKS, Example, GlueFormatError, TaskSpec, parse_file, resolve_task, split_files
from .tokenization import TokenizerSpec, encode_all, train_sentencepiece

FORMATS = ("sentence_prediction", "text2text")


# ----------------------------------------------------------------------------------------------
# splits


@dataclass
class OutSplit:
    """One output split: fairseq name, its examples and where they came from."""

    name: str  # fairseq split name (train, valid, valid1, test, ...) before any text2text suffix
    examples: list
    info: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.examples) and self.examples[0].label is not None


def _fairseq_name(base: str, k: int) -> str:
    return base if k == 0 else f"{base}{k}"


# Any text holding an ASCII letter or digit yields a token with every tokenizer here (GPT-2 bytes, WordPiece
# and SentencePiece keep them, or map them to <unk>): only the other texts need tokenizing to find empty ones.
_SURELY_TOKENIZED = re.compile(r"[A-Za-z0-9]")


def drop_untokenizable(spec: TaskSpec, split: OutSplit, tok: TokenizerSpec, skip_bad_rows: bool) -> None:
    """A row with a text that tokenizes to nothing (e.g. only zero-width or combining characters, which the
    parser's strip() keeps) is a bad row: GlueFormatError `file:line:`, or skipped and counted under
    --skip-bad-rows; a split left without rows is an error either way."""
    suspects = [
        (i, c) for i, ex in enumerate(split.examples) for c, t in enumerate(ex.texts) if not _SURELY_TOKENIZED.search(t)
    ]
    encoded = encode_all(tok, [split.examples[i].texts[c] for i, c in suspects]) if suspects else []
    bad: dict = {}
    for (i, c), tokens in zip(suspects, encoded):
        if not tokens.strip() and i not in bad:
            ex = split.examples[i]
            bad[i] = (
                f"{split.info['file']}:{ex.line}: {spec.fields[c]} {ex.texts[c]!r} tokenizes to nothing ({tok.kind})"
            )
    if not bad:
        return
    if not skip_bad_rows:
        raise GlueFormatError(next(iter(bad.values())) + "; fix the row or pass --skip-bad-rows")
    split.examples = [ex for i, ex in enumerate(split.examples) if i not in bad]
    split.info["rows_written"] = len(split.examples)
    split.info["rows_skipped"] = split.info.get("rows_skipped", 0) + len(bad)
    split.info["skipped_examples"] = (split.info.get("skipped_examples", []) + list(bad.values()))[:20]
    if not split.examples:
        raise GlueFormatError(
            f"{next(iter(bad.values()))}, and so does every other row of split {split.name}: nothing left to write"
        )


def load_task_splits(
    glue_dir, spec: TaskSpec, *, skip_bad_rows=False, train_subset_size=None, subset_seed=1, dev_from_train=0
) -> list:
    """Parse a task's files and apply carving/subsetting; returns [OutSplit] in fairseq order."""
    parsed = {}  # glue split -> [(path, ParseResult or None)]
    for glue_split in ("train", "valid", "test"):
        entries = []
        for path, layout in split_files(glue_dir, spec, glue_split):
            entries.append((path, parse_file(path, spec, layout, skip_bad_rows) if path.is_file() else None))
        parsed[glue_split] = entries

    def info(path, res, written):
        if res is None:
            return {"file": str(path), "missing": True, "rows_read": 0, "rows_written": 0, "rows_skipped": 0}
        return {
            "file": str(path),
            "rows_read": res.rows_read,
            "rows_written": written,
            "rows_skipped": len(res.skipped),
            "skipped_examples": res.skipped[:20],
        }

    out = []
    train_path, train_res = parsed["train"][0]
    train = list(train_res.examples) if train_res is not None else None
    carved = None
    if dev_from_train:
        if train is None:
            raise ValueError(f"--dev-from-train needs {train_path}, which does not exist")
        if dev_from_train >= len(train):
            raise ValueError(
                f"--dev-from-train {dev_from_train} must be smaller than the {len(train)} train rows of {spec.name}"
            )
        order = list(range(len(train)))
        random.Random(subset_seed).shuffle(order)
        carved_idx = set(order[:dev_from_train])
        carved = [ex for i, ex in enumerate(train) if i in carved_idx]
        train = [ex for i, ex in enumerate(train) if i not in carved_idx]
    if train is not None and train_subset_size and train_subset_size < len(train):
        keep = sorted(random.Random(subset_seed + 1).sample(range(len(train)), train_subset_size))
        train = [train[i] for i in keep]
    if train is not None:
        i = info(train_path, train_res, len(train))
        if carved is not None:
            i["carved_to_valid"] = len(carved)
        out.append(OutSplit("train", train, i))
    else:
        out.append(OutSplit("train", [], info(train_path, None, 0)))

    if carved is not None:
        out.append(
            OutSplit(
                "valid",
                carved,
                {
                    "file": str(train_path),
                    "carved_from_train": len(carved),
                    "rows_written": len(carved),
                    "seed": subset_seed,
                },
            )
        )
        sources = [("test", parsed["valid"])]  # GLUE dev keeps its labels as the test split
    else:
        sources = [("valid", parsed["valid"]), ("test", parsed["test"])]
    for base, entries in sources:
        k = 0
        for path, res in entries:
            name = _fairseq_name(base, k)
            k += 1
            exs = res.examples if res is not None else []
            out.append(OutSplit(name, exs, info(path, res, len(exs))))
    return out


# ----------------------------------------------------------------------------------------------
# fairseq binarization (fairseq's own Dictionary / FileBinarizer, as fairseq-preprocess uses them)


def _write_lines(path: Path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def build_fairseq_dict(token_files, dest: Path, workers=1):
    """fairseq-preprocess's dictionary: frequency-sorted, padded to a multiple of 8."""
    from fairseq.tasks.fairseq_task import FairseqTask

    d = FairseqTask.build_dictionary(
        [str(f) for f in token_files], workers=workers, threshold=-1, nwords=-1, padding_factor=8
    )
    d.save(str(dest))
    return dest


def write_vocab_dict(vocab_txt, dest: Path):
    """fairseq dict listing vocab.txt in vocab order, so fairseq id = vocab id + 4 (4 fairseq specials)."""
    tokens = [t.rstrip("\r\n") for t in Path(vocab_txt).read_text(encoding="utf-8").split("\n")]
    if tokens and tokens[-1] == "":
        tokens.pop()
    seen = set()
    with open(dest, "w", encoding="utf-8") as f:
        for i, tok in enumerate(tokens):
            if not tok or any(c.isspace() for c in tok):
                raise ValueError(f"{vocab_txt}:{i + 1}: vocab token {tok!r} is empty or holds whitespace")
            if tok in seen:
                raise ValueError(f"{vocab_txt}:{i + 1}: duplicate vocab token {tok!r}")
            seen.add(tok)
            f.write(f"{tok} 1\n")
    return dest


def binarize(token_file: Path, dictionary, out_prefix: Path, workers=1) -> dict:
    """Binarize a token file with fairseq's FileBinarizer (mmap .bin/.idx, eos appended)."""
    from fairseq.binarizer import FileBinarizer, VocabularyDatasetBinarizer

    summary = FileBinarizer.multiprocess_dataset(
        str(token_file),
        "mmap",
        VocabularyDatasetBinarizer(dictionary, append_eos=True),
        str(out_prefix),
        vocab_size=len(dictionary),
        num_workers=max(1, workers),
    )
    return {
        "sequences": summary.num_seq,
        "tokens": summary.num_tok,
        "unk_replaced": summary.num_replaced,
        "unk_percent": round(summary.replaced_percent, 4),
    }


def _write_source_dict(dict_path: Path, srcdict, tok, train_files, workers: int, what: str) -> Path:
    """The model's dictionary when given (--srcdict), the vocab.txt order for WordPiece, else one
    built from the train split the way fairseq-preprocess builds it."""
    if srcdict:
        shutil.copyfile(srcdict, dict_path)
    elif tok.kind == "wordpiece":
        write_vocab_dict(tok.wordpiece_vocab, dict_path)
    else:
        if not train_files:
            raise ValueError(f"{what}: no train split to build a dictionary from; pass --srcdict")
        build_fairseq_dict(train_files, dict_path, workers)
    return dict_path


def _load_dict(path):
    from fairseq.data import Dictionary

    return Dictionary.load(str(path))


# ----------------------------------------------------------------------------------------------
# formats


def _class_id(spec: TaskSpec, ex: Example) -> int:
    assert spec.labels is not None, f"{spec.name} is a regression task: no class ids"
    return spec.labels.index(ex.label)


def stsb_target(score: float) -> str:
    """T5's STS-B target: nearest multiple of 0.2, one decimal."""
    return f"{round(score * 5) / 5:.1f}"


def t2t_split_name(spec: TaskSpec, name: str) -> str:
    """valid -> valid_rte; MNLI's valid1 (mismatched) -> valid_mnli_mm; test -> test_rte."""
    base = name.rstrip("0123456789")
    k = name[len(base) :]
    suffix = "" if not k else ("_mm" if spec.name == "MNLI" and k == "1" else f"_{k}")
    return f"{base}_{spec.t2t_name}{suffix}"


def t2t_source(spec: TaskSpec, ex: Example) -> str:
    return " ".join([spec.t2t_name] + [f"{f}: {t}" for f, t in zip(spec.fields, ex.texts)])


def t2t_target(spec: TaskSpec, ex: Example) -> str:
    if spec.regression:
        return stsb_target(ex.score)
    assert spec.label_words is not None, f"{spec.name}: classification task without text2text label words"
    return spec.label_words[_class_id(spec, ex)]


def _maybe_train_sentencepiece(tok: TokenizerSpec, task_splits, tmp: Path, vocab_size, text_fn):
    if tok.kind != "sentencepiece" or tok.sentencepiece_model:
        return tok
    texts = [
        t
        for spec, splits in task_splits
        for s in splits
        if s.name == "train"
        for ex in s.examples
        for t in text_fn(spec, ex)
    ]
    if not texts:
        raise ValueError("--tokenizer sentencepiece without --sentencepiece-model needs a train split to learn from")
    model = train_sentencepiece(texts, tmp / "sentencepiece", vocab_size)
    (tmp / "sentencepiece.vocab").unlink(missing_ok=True)
    return TokenizerSpec("sentencepiece", sentencepiece_model=str(model))


def _sentence_prediction_task(spec, splits, tok, out_dir, srcdict, workers, overwrite, sp_vocab_size, skip_bad_rows):
    final = Path(out_dir) / f"{spec.name}-bin"
    all_splits = splits
    splits = [s for s in splits if s.examples]  # missing files: reported, not written
    with atomic_dir(final, overwrite) as tmp:
        raw = tmp / ".raw"
        raw.mkdir()
        tok = _maybe_train_sentencepiece(tok, [(spec, splits)], tmp, sp_vocab_size, lambda sp, ex: ex.texts)
        for s in splits:
            drop_untokenizable(spec, s, tok, skip_bad_rows)
        inputs = [f"input{i}" for i in range(spec.n_inputs)]
        t0 = time.time()
        n_rows = 0
        for s in splits:
            for i, col in enumerate(inputs):
                _write_lines(raw / f"{s.name}.{col}", encode_all(tok, [ex.texts[i] for ex in s.examples], workers))
            n_rows += len(s.examples)
        encode_s = time.time() - t0

        # One source dictionary for both inputs: sentence_prediction reads only input0/dict.txt.
        train_files = [raw / f"train.{col}" for col in inputs if (raw / f"train.{col}").exists()]
        dict_path = _write_source_dict(raw / "dict.txt", srcdict, tok, train_files, workers, spec.name)
        dictionary = _load_dict(dict_path)

        stats = {}
        for col in inputs:
            (tmp / col).mkdir()
            shutil.copyfile(dict_path, tmp / col / "dict.txt")
            for s in splits:
                stats[f"{col}/{s.name}"] = binarize(raw / f"{s.name}.{col}", dictionary, tmp / col / s.name, workers)

        (tmp / "label").mkdir()
        labelled = [s for s in splits if s.labelled]
        if spec.regression:
            for s in labelled:
                # fairseq's recipe: score / 5.0, so the regression target is in [0, 1]
                _write_lines(tmp / "label" / f"{s.name}.label", (f"{ex.score / 5.0:.6g}" for ex in s.examples))
        else:
            train = next((s for s in splits if s.name == "train"), None)
            counts = {lab: 0 for lab in spec.labels}
            for ex in train.examples if train else []:
                counts[ex.label] += 1
            # fixed label order (class id = HF glue label id), not frequency order
            _write_lines(tmp / "label" / "dict.txt", (f"{lab} {counts[lab]}" for lab in spec.labels))
            label_dict = _load_dict(tmp / "label" / "dict.txt")
            for s in labelled:
                _write_lines(raw / f"{s.name}.label", (ex.label for ex in s.examples))
                stats[f"label/{s.name}"] = binarize(raw / f"{s.name}.label", label_dict, tmp / "label" / s.name, 1)
        shutil.rmtree(raw)
        summary = {
            "task": spec.name,
            "format": "sentence_prediction",
            "tokenizer": _describe(tok, tmp, final),
            "srcdict": str(srcdict) if srcdict else None,
            "output": str(final),
            "num_classes": 1 if spec.regression else len(spec.labels),
            "regression": spec.regression,
            "labels": list(spec.labels) if spec.labels else None,
            "splits": {s.name: s.info for s in all_splits},
            "binarized": stats,
            "encode_seconds": round(encode_s, 3),
            "encoded_rows": n_rows,
            "dict_and_binarize_seconds": round(time.time() - t0 - encode_s, 3),
        }
        _write_summary(tmp, summary)
    return summary


def _describe(tok: TokenizerSpec, tmp: Path, final: Path) -> dict:
    """Tokenizer settings with absolute paths as they will be after the rename (a trained model moves)."""
    info = {}
    for key, value in tok.describe().items():
        if isinstance(value, str) and key != "kind":
            path = Path(value).resolve()
            if path.is_relative_to(tmp.resolve()):
                path = final.resolve() / path.relative_to(tmp.resolve())
            value = str(path)
        info[key] = value
    return info


def _write_summary(folder: Path, summary: dict):
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _text2text(task_splits, tok, out_dir, srcdict, workers, overwrite, sp_vocab_size, skip_bad_rows):
    final = Path(out_dir) / "text2text-bin"
    with atomic_dir(final, overwrite) as tmp:
        raw = tmp / ".raw"
        raw.mkdir()
        tok = _maybe_train_sentencepiece(
            tok, task_splits, tmp, sp_vocab_size, lambda spec, ex: [t2t_source(spec, ex), t2t_target(spec, ex)]
        )
        for spec, splits in task_splits:
            for s in splits:
                if s.examples:
                    drop_untokenizable(spec, s, tok, skip_bad_rows)
        # name -> [(spec, examples)]; train mixes all tasks, every other split is per task
        out_splits = {"train": []}
        tasks_meta = {}
        split_infos = {}
        for spec, splits in task_splits:
            meta = {
                "glue_name": spec.name,
                "type": "regression" if spec.regression else "classification",
                "metrics": list(spec.metrics),
                "valid_splits": [],
                "test_splits": [],
            }
            if spec.regression:
                meta["round_to"] = 0.2
            else:
                meta["labels"] = list(spec.label_words)
                meta["glue_labels"] = list(spec.labels)
            for s in splits:
                if not s.labelled:
                    continue  # unlabelled GLUE test: the translation task needs targets
                if s.name == "train":
                    out_splits["train"].append((spec, s.examples))
                    split_infos.setdefault("train", {})[spec.t2t_name] = s.info
                    continue
                name = t2t_split_name(spec, s.name)
                base = name.split("_")[0]
                out_splits[name] = [(spec, s.examples)]
                meta["valid_splits" if base == "valid" else "test_splits"].append(name)
                split_infos[name] = s.info
            tasks_meta[spec.t2t_name] = meta
        if not out_splits["train"]:
            raise ValueError("--format text2text needs at least one task with a train split")

        t0 = time.time()
        n_rows = 0
        for name, parts in out_splits.items():
            pairs = [(spec, ex) for spec, exs in parts for ex in exs]
            _write_lines(raw / f"{name}.src", encode_all(tok, [t2t_source(sp, ex) for sp, ex in pairs], workers))
            _write_lines(raw / f"{name}.tgt", encode_all(tok, [t2t_target(sp, ex) for sp, ex in pairs], workers))
            _write_lines(tmp / f"{name}.task", (sp.t2t_name for sp, _ in pairs))
            _write_lines(tmp / f"{name}.ref", (t2t_target(sp, ex) for sp, ex in pairs))
            _write_lines(
                tmp / f"{name}.gold", (ex.label if sp.regression else str(_class_id(sp, ex)) for sp, ex in pairs)
            )
            n_rows += len(pairs)
        encode_s = time.time() - t0

        dict_path = _write_source_dict(
            raw / "dict.txt", srcdict, tok, [raw / "train.src", raw / "train.tgt"], workers, "text2text"
        )  # joint src/tgt dictionary
        dictionary = _load_dict(dict_path)
        for lang in ("src", "tgt"):
            shutil.copyfile(dict_path, tmp / f"dict.{lang}.txt")
        stats = {}
        for name in out_splits:
            for lang in ("src", "tgt"):
                stats[f"{name}.{lang}"] = binarize(
                    raw / f"{name}.{lang}", dictionary, tmp / f"{name}.src-tgt.{lang}", workers
                )
        shutil.rmtree(raw)
        meta = {
            "format": "text2text",
            "source_lang": "src",
            "target_lang": "tgt",
            "tokenizer": _describe(tok, tmp, final),
            "srcdict": str(srcdict) if srcdict else None,
            "train_split": "train",
            "splits": {n: sum(len(e) for _, e in p) for n, p in out_splits.items()},
            "tasks": tasks_meta,
        }
        (tmp / "tasks.json").write_text(json.dumps(meta, indent=2) + "\n")
        summary = {
            "format": "text2text",
            "output": str(final),
            "tokenizer": _describe(tok, tmp, final),
            "splits": split_infos,
            "binarized": stats,
            "encode_seconds": round(encode_s, 3),
            "dict_and_binarize_seconds": round(time.time() - t0 - encode_s, 3),
            "encoded_rows": n_rows,
        }
        _write_summary(tmp, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# public API


def require_train_and_dev(spec: TaskSpec, splits: list) -> None:
    """A task folder without its train or dev file stops the run: a `<TASK>-bin` without them cannot be
    fine-tuned on or validated (fairseq-train would fail later, or train without a dev set).
    `--allow-missing-splits` binarizes what is there instead (e.g. dev alone, for evaluation)."""
    missing = [s.info["file"] for s in splits if s.name in ("train", "valid") and s.info.get("missing")]
    if missing:
        raise ValueError(
            f"--tasks {spec.name}: {' and '.join(missing)} not found. Download the complete task (GLUE's "
            "download_glue_data.py), or pass --allow-missing-splits to binarize only the splits that are there "
            "(reported as missing in summary.json)"
        )


def preprocess(
    glue_dir,
    tasks,
    output_dir,
    tokenizer,
    format="sentence_prediction",
    *,
    srcdict=None,
    gpt2_encoder_json=None,
    gpt2_vocab_bpe=None,
    sentencepiece_model=None,
    sentencepiece_vocab_size=8000,
    wordpiece_vocab=None,
    wordpiece_cased=False,
    train_subset_size=None,
    subset_seed=1,
    dev_from_train=0,
    workers=1,
    skip_bad_rows=False,
    overwrite=False,
    allow_missing_splits=False,
    log=print,
) -> dict:
    """Binarize GLUE tasks; see glue_preprocess/README.md. Returns the summaries."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if [t.strip().lower() for t in tasks] == ["all"]:
        tasks = [name for name in TASKS if (Path(glue_dir) / name).is_dir()]  # every task folder present
    if not tasks:
        raise ValueError("--tasks: give at least one task, e.g. --tasks RTE,MRPC")
    specs = []
    for t in tasks:
        spec = resolve_task(t)
        if spec not in specs:
            specs.append(spec)
    if not Path(glue_dir).is_dir():
        raise ValueError(f"--glue-dir {glue_dir} is not a directory")
    if srcdict and not Path(srcdict).is_file():
        raise ValueError(f"--srcdict: no such file {srcdict!r}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if train_subset_size is not None and train_subset_size < 1:
        raise ValueError(f"--train-subset-size must be >= 1, got {train_subset_size}")
    if dev_from_train < 0:
        raise ValueError(f"--dev-from-train must be >= 0, got {dev_from_train}")
    if sentencepiece_vocab_size < 8:
        raise ValueError(f"--sentencepiece-vocab-size must be >= 8, got {sentencepiece_vocab_size}")
    tok = TokenizerSpec(
        tokenizer,
        gpt2_encoder_json=gpt2_encoder_json,
        gpt2_vocab_bpe=gpt2_vocab_bpe,
        sentencepiece_model=sentencepiece_model,
        wordpiece_vocab=wordpiece_vocab,
        wordpiece_cased=wordpiece_cased,
    )
    tok.validate()
    for spec in specs:
        if not (Path(glue_dir) / spec.name).is_dir():
            raise ValueError(f"--tasks {spec.name}: folder {Path(glue_dir) / spec.name} not found in --glue-dir")

    task_splits = []
    for spec in specs:
        splits = load_task_splits(
            glue_dir,
            spec,
            skip_bad_rows=skip_bad_rows,
            train_subset_size=train_subset_size,
            subset_seed=subset_seed,
            dev_from_train=dev_from_train,
        )
        if not allow_missing_splits:
            require_train_and_dev(spec, splits)
        task_splits.append((spec, splits))

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    result: dict = {"tasks": {}}
    if format == "sentence_prediction":
        for spec, splits in task_splits:
            summary = _sentence_prediction_task(
                spec, splits, tok, output_dir, srcdict, workers, overwrite, sentencepiece_vocab_size, skip_bad_rows
            )
            result["tasks"][spec.name] = summary
            log(format_summary(summary))
    else:
        summary = _text2text(
            task_splits, tok, output_dir, srcdict, workers, overwrite, sentencepiece_vocab_size, skip_bad_rows
        )
        result["text2text"] = summary
        log(format_summary(summary))
    return result


def format_summary(summary: dict) -> str:
    head = summary.get("task", "text2text")
    lines = [f"[{head}] -> {summary['output']}"]
    for name, info in summary["splits"].items():
        infos = info.items() if "file" not in info else [(None, info)]
        for sub, i in infos:
            label = f"{name}/{sub}" if sub else name
            if i.get("missing"):
                lines.append(f"  {label:<14} missing: {i['file']}")
                continue
            extra = f" (carved {i['carved_to_valid']} to valid)" if "carved_to_valid" in i else ""
            lines.append(
                f"  {label:<14} read {i.get('rows_read', i.get('carved_from_train', 0)):>7}  "
                f"written {i['rows_written']:>7}  skipped {i.get('rows_skipped', 0):>5}{extra}"
            )
            for reason in i.get("skipped_examples", [])[:3]:
                lines.append(f"      skipped {reason}")
    return "\n".join(lines)


__all__ = ["preprocess", "GlueFormatError", "load_task_splits", "FORMATS"]
