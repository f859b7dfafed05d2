"""MRQA 2019 shared task -> text-to-text context windows for BART (`python -m seq2seq_preprocess.mrqa`).

Input (datasets.md §7a): gzipped JSON lines, line 1 a header `{"header": {"dataset", "split"}}`, then one
context per line with its questions (`context`, `qas`: `qid`, `question`, `answers`, `detected_answers` with
INCLUSIVE `char_spans`). In-domain train files in `train/`, dev files in `dev/` (the shared task's download
scripts; `in-domain/` and `out-domain/` as the Hyperdecoders eval folders also work).

Windows (allenai/hyperdecoders `data/mrqa_preprocess.py` L8-55, datasets.md §7d): the source is
`question: {question} context:` followed by a window of the context's GPT-2 BPE tokens, at most `--window`
tokens in all with the final `</s>`; the next window starts `--stride` tokens before the previous one ends;
windowing stops once a window reaches the end of the context. A window's target is the first detected
answer span (in file order) that lies wholly inside it, as it appears in the context, or "" (kept: the model
learns to answer "" where the answer is not in the window). `--no-windows` keeps only the first window.

Differences from the reference, on purpose: the target is the span's own text (the reference takes
`answers[i]`, assuming the i-th accepted answer matches the i-th detected one, which the format does not
promise); the span must end inside the window (the reference's inclusive-vs-exclusive comparison lets it
run one character past); questions longer than `--max-question-tokens` are truncated (BERT's
max_query_length; the reference would loop forever once the question leaves no room for the stride).

Output `OUT/mrqa-bin/` (fairseq translation layout, languages source/target, one joint dictionary):
`train` = the windows of the six in-domain train sets, concatenated (the reference's unbalanced mixture),
`valid_<key>` per in-domain dev set, `test_<key>` per out-of-domain dev set (keys in `DATASETS`); beside each
split `<split>.task` ("mrqa" per window: one task, as the reference's MRQA configs) and `<split>.mrqa.jsonl`
(per window: qid, dataset, window index, number of windows, accepted answers); `tasks.json`, `summary.json`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from glue_preprocess.core import atomic_dir, binarize, build_fairseq_dict
from glue_preprocess.tokenization import TokenizerSpec

from .core import SOURCE_LANG, TARGET_LANG
from .records import Seq2SeqFormatError


@dataclass(frozen=True)
class MrqaDataset:
    name: str  # the header's `dataset` (official name)
    key: str  # fairseq split suffix
    domain: str  # "in" (train + dev) or "out" (dev only)
    files: tuple[str, ...]  # file stems the download scripts use


# MRQA README L57-90; download_train.sh saves TriviaQA-web as TriviaQA and NaturalQuestionsShort as
# NaturalQuestions, the out-of-domain script DuoRC.ParaphraseRC as DuoRC (datasets.md §7a)
DATASETS = (
    MrqaDataset("SQuAD", "squad", "in", ("SQuAD",)),
    MrqaDataset("NewsQA", "newsqa", "in", ("NewsQA",)),
    MrqaDataset("TriviaQA-web", "triviaqa", "in", ("TriviaQA-web", "TriviaQA")),
    MrqaDataset("SearchQA", "searchqa", "in", ("SearchQA",)),
    MrqaDataset("HotpotQA", "hotpotqa", "in", ("HotpotQA",)),
    MrqaDataset("NaturalQuestionsShort", "naturalquestions", "in", ("NaturalQuestionsShort", "NaturalQuestions")),
    MrqaDataset("BioASQ", "bioasq", "out", ("BioASQ",)),
    MrqaDataset("DROP", "drop", "out", ("DROP",)),
    MrqaDataset("DuoRC.ParaphraseRC", "duorc", "out", ("DuoRC.ParaphraseRC", "DuoRC")),
    MrqaDataset("RACE", "race", "out", ("RACE",)),
    MrqaDataset("RelationExtraction", "relationextraction", "out", ("RelationExtraction",)),
    MrqaDataset("TextbookQA", "textbookqa", "out", ("TextbookQA",)),
)
BY_KEY = {d.key: d for d in DATASETS}
TASK_NAME = "mrqa"
FOLDERS = {"train": ("train",), "in": ("dev", "in-domain", "in_domain"), "out": ("dev", "out-domain", "out_of_domain")}


@dataclass(frozen=True)
class WindowOptions:
    window: int = 512  # tokens per source, </s> included (reference max_length)
    stride: int = 128  # overlap of consecutive windows (reference `stride`)
    windows: bool = True
    max_question_tokens: int = 64

    def validate(self) -> None:
        for flag, value in (("--window", self.window), ("--max-question-tokens", self.max_question_tokens)):
            if value < 1:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.stride < 0:
            raise ValueError(f"--stride must be >= 0, got {self.stride}")
        # the longest prefix: "question:" + question + " context:" (a few tokens) + </s>
        room = self.window - self.max_question_tokens - 8
        if self.windows and room <= self.stride:
            raise ValueError(
                f"--window {self.window} leaves {room} context tokens after a {self.max_question_tokens}-token "
                f"question, not more than --stride {self.stride}: windows would not advance; raise --window or "
                "lower --stride / --max-question-tokens"
            )


# ------------------------------------------------------------------------------------------ tokenization
class Gpt2WithOffsets:
    """fairseq's GPT-2 byte-level BPE (`gpt2_bpe_utils.Encoder`, the ids BART's dict.txt lists) with the
    character span of every token, so answer spans can be placed in windows."""

    def __init__(self, encoder_json: str, vocab_bpe: str):
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        self.bpe = get_encoder(encoder_json, vocab_bpe)

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [(start, end) character offsets, end exclusive]) of `text`; ids equal `Encoder.encode(text)`.
        A token that starts or ends inside a multi-byte character covers the whole character."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        bpe = self.bpe
        for match in bpe.re.finditer(bpe.pat, text):
            piece_text = match.group()
            byte_to_char = [i for i, ch in enumerate(piece_text) for _ in ch.encode("utf-8")]
            encoded = "".join(bpe.byte_encoder[b] for b in piece_text.encode("utf-8"))
            pos = 0
            for token in bpe.bpe(encoded).split(" "):
                first, last = byte_to_char[pos], byte_to_char[pos + len(token) - 1]
                ids.append(bpe.encoder[token])
                offsets.append((match.start() + first, match.start() + last + 1))
                pos += len(token)
        return ids, offsets


# ------------------------------------------------------------------------------------------ windows
@dataclass
class Window:
    source: list[int]  # BPE ids, without </s> (the binarizer appends it)
    target: str  # answer text or ""
    index: int
    count: int


def answer_spans(qa: dict) -> Iterator[tuple[int, int]]:
    """(start, end exclusive) of every detected answer span, in file order."""
    for detected in qa["detected_answers"]:
        for start, end in detected["char_spans"]:
            yield start, end + 1  # spans are inclusive


def question_windows(
    tok: Gpt2WithOffsets, context: str, ctx_ids: list[int], offsets: list[tuple[int, int]], qa: dict, opt: WindowOptions
) -> list[Window]:
    question_ids = tok.encode(" " + qa["question"].strip())[: opt.max_question_tokens]
    prefix = tok.encode("question:") + question_ids + tok.encode(" context:")
    width = opt.window - len(prefix) - 1  # room for context tokens (</s> is appended at binarization)
    starts = [0]
    while opt.windows and starts[-1] + width < len(ctx_ids):
        starts.append(starts[-1] + width - opt.stride)
    spans = list(answer_spans(qa))
    windows = []
    for k, start in enumerate(starts):
        end = min(start + width, len(ctx_ids))
        lo, hi = offsets[start][0], offsets[end - 1][1]
        inside = next(((s, e) for s, e in spans if s >= lo and e <= hi), None)
        target = context[inside[0] : inside[1]].strip() if inside else ""
        windows.append(Window(prefix + ctx_ids[start:end], target, k, len(starts)))
    return windows


def check_context(obj) -> str | None:
    """The reason a context line is malformed, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("context"), str) or not obj["context"].strip():
        return "missing or empty 'context'"
    if not isinstance(obj.get("qas"), list):
        return "missing 'qas' list"
    n = len(obj["context"])
    for i, qa in enumerate(obj["qas"]):
        if not isinstance(qa, dict):
            return f"qas[{i}] is not an object"
        for key in ("qid", "question"):
            if not isinstance(qa.get(key), str) or not qa[key].strip():
                return f"qas[{i}]: missing or empty {key!r}"
        if not isinstance(qa.get("answers"), list) or not all(isinstance(a, str) for a in qa["answers"]):
            return f"qas[{i}] ({qa['qid']}): 'answers' must be a list of strings"
        detected = qa.get("detected_answers")
        if not isinstance(detected, list):
            return f"qas[{i}] ({qa['qid']}): missing 'detected_answers' list"
        for d in detected:
            spans = d.get("char_spans") if isinstance(d, dict) else None
            if not isinstance(spans, list):
                return f"qas[{i}] ({qa['qid']}): a detected answer has no 'char_spans'"
            for span in spans:
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)):
                    return f"qas[{i}] ({qa['qid']}): char span {span!r} is not [start, end]"
                if not 0 <= span[0] <= span[1] < n:
                    return f"qas[{i}] ({qa['qid']}): char span {span} outside the {n}-character context"
    return None


# ------------------------------------------------------------------------------------------ files
def find_file(root: Path, dataset: MrqaDataset, kind: str) -> Path | None:
    """The file of `dataset` for `kind` (train, in = in-domain dev, out = out-of-domain dev)."""
    for folder in FOLDERS[kind]:
        for stem in dataset.files:
            for suffix in (".jsonl.gz", ".jsonl"):
                path = root / folder / f"{stem}{suffix}"
                if path.is_file():
                    return path
    return None


def iter_contexts(path: Path, expected_split: str) -> Iterator[tuple[str, dict]]:
    """(file:line, context object) of one MRQA file; the header (line 1, if it has one) must name the split."""
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise Seq2SeqFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise Seq2SeqFormatError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if lineno == 1 and isinstance(obj, dict) and "header" in obj:
                split = obj["header"].get("split") if isinstance(obj["header"], dict) else None
                if split != expected_split:
                    raise Seq2SeqFormatError(
                        f"{where}: header says split {split!r}, expected {expected_split!r} for this folder"
                    )
                continue
            yield where, obj


# ------------------------------------------------------------------------------------------ workers
_worker: dict = {}


def _init_worker(encoder_json: str, vocab_bpe: str, opt: WindowOptions, skip_bad_rows: bool) -> None:
    _worker.update(tok=Gpt2WithOffsets(encoder_json, vocab_bpe), opt=opt, skip=skip_bad_rows)


def _encode_context(item: tuple[str, dict, str]) -> tuple[str, list[tuple[str, str, str]] | str]:
    """(where, [(source ids, target text, metadata json) per window] or the reason the row is bad)."""
    where, obj, dataset = item
    reason = check_context(obj)
    if reason is not None:
        if not _worker["skip"]:
            raise Seq2SeqFormatError(f"{where}: {reason}")
        return where, reason
    tok, opt = _worker["tok"], _worker["opt"]
    context = obj["context"]
    # the context follows "context:" in the source, so it is encoded after a space (offsets shifted back)
    ids, offsets = tok.encode_with_offsets(" " + context)
    offsets = [(max(s - 1, 0), e - 1) for s, e in offsets]
    rows = []
    for qa in obj["qas"]:
        for w in question_windows(tok, context, ids, offsets, qa, opt):
            meta = {
                "qid": qa["qid"],
                "dataset": dataset,
                "window": w.index,
                "windows": w.count,
                "answers": qa["answers"],
            }
            rows.append((" ".join(map(str, w.source)), w.target, json.dumps(meta, ensure_ascii=False)))
    return where, rows


@dataclass
class SplitStats:
    files: list[str]
    contexts: int = 0
    questions: int = 0
    windows: int = 0
    answered_windows: int = 0
    unanswerable_questions: int = 0  # no window holds a detected answer
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def info(self) -> dict:
        return {**self.__dict__, "skipped_examples": self.skipped_examples[:20]}


@contextmanager
def _context_encoder(workers: int, init: tuple):
    """A map of `_encode_context` over contexts, order kept: in this process, or a pool of `workers`."""
    if workers == 1:
        _init_worker(*init)
        yield lambda items: map(_encode_context, items)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init) as pool:
        yield lambda items: pool.imap(_encode_context, items, chunksize=16)


def write_split(
    encode, tok: Gpt2WithOffsets, items: list[tuple[Path, str, str]], raw: Path, out: Path, name: str, max_contexts
) -> SplitStats:
    """Encode every context of `items` (path, expected header split, dataset name) into raw token files
    `raw/<name>.source|target` and the metadata files `out/<name>.task|mrqa.jsonl`."""
    stats = SplitStats(files=[str(p) for p, _, _ in items])
    src_f = open(raw / f"{name}.{SOURCE_LANG}", "w", encoding="utf-8")
    tgt_f = open(raw / f"{name}.target.txt", "w", encoding="utf-8")
    meta_f = open(out / f"{name}.mrqa.jsonl", "w", encoding="utf-8")
    with src_f, tgt_f, meta_f:
        for path, split, dataset in items:
            contexts = _limited(iter_contexts(path, split), max_contexts)
            for where, rows in encode((w, o, dataset) for w, o in contexts):
                stats.contexts += 1
                if isinstance(rows, str):
                    stats.skipped += 1
                    stats.skipped_examples.append(f"{where}: {rows}")
                    continue
                questions: dict[str, bool] = {}
                for source, target, meta in rows:
                    src_f.write(source + "\n")
                    tgt_f.write(target + "\n")
                    meta_f.write(meta + "\n")
                    qid = json.loads(meta)["qid"]
                    questions[qid] = questions.get(qid, False) or bool(target)
                    stats.windows += 1
                    stats.answered_windows += bool(target)
                stats.questions += len(questions)
                stats.unanswerable_questions += sum(not v for v in questions.values())
    # targets are answer texts; BPE-encode them here (sources are already ids)
    with open(raw / f"{name}.target.txt", encoding="utf-8") as f, open(raw / f"{name}.{TARGET_LANG}", "w") as g:
        for line in f:
            g.write(" ".join(map(str, tok.encode(line.rstrip("\n")))) + "\n")
    n = stats.windows
    (out / f"{name}.task").write_text(f"{TASK_NAME}\n" * n, encoding="utf-8")
    return stats


def _limited(iterator, limit):
    for i, item in enumerate(iterator):
        if limit is not None and i >= limit:
            return
        yield item


def plan_splits(input_dir: Path, keys: list[str]) -> dict[str, list[tuple[Path, str, str]]]:
    """{fairseq split: [(file, header split, dataset name)]} for the chosen datasets; a missing file is an error."""
    plan: dict[str, list[tuple[Path, str, str]]] = {"train": []}
    for key in keys:
        d = BY_KEY[key]
        kinds = ("train", "in") if d.domain == "in" else ("out",)
        for kind in kinds:
            path = find_file(input_dir, d, kind)
            if path is None:
                where = " or ".join(f"{input_dir}/{f}/{d.files[0]}.jsonl.gz" for f in FOLDERS[kind])
                raise FileNotFoundError(f"{d.name} ({'train' if kind == 'train' else 'dev'}): not found ({where})")
            split = "train" if kind == "train" else ("valid_" if d.domain == "in" else "test_") + d.key
            plan.setdefault(split, []).append((path, "train" if kind == "train" else "dev", d.name))
    if not plan["train"]:
        del plan["train"]
    return plan


def preprocess(
    input_dir,
    output_dir,
    *,
    gpt2_encoder_json: str,
    gpt2_vocab_bpe: str,
    srcdict: str | None = None,
    datasets: str | list[str] | None = None,
    window: int = 512,
    stride: int = 128,
    no_windows: bool = False,
    max_question_tokens: int = 64,
    max_contexts: int | None = None,
    workers: int = 1,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Write OUT/mrqa-bin/ (see the module docstring); returns its summary."""
    opt = WindowOptions(window, stride, not no_windows, max_question_tokens)
    opt.validate()
    spec = TokenizerSpec("gpt2", gpt2_encoder_json=gpt2_encoder_json, gpt2_vocab_bpe=gpt2_vocab_bpe)
    spec.validate()
    keys = [k.strip().lower() for k in datasets.split(",")] if isinstance(datasets, str) else list(datasets or BY_KEY)
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise ValueError(f"--datasets: unknown {unknown}; known: {','.join(BY_KEY)}")
    if srcdict and not Path(srcdict).is_file():
        raise ValueError(f"--srcdict: no such file {srcdict!r}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    plan = plan_splits(Path(input_dir), keys)
    tok = Gpt2WithOffsets(gpt2_encoder_json, gpt2_vocab_bpe)
    final = Path(output_dir) / "mrqa-bin"
    t0 = time.time()
    with atomic_dir(final, overwrite) as tmp:
        raw = tmp / ".raw"
        raw.mkdir()
        init = (gpt2_encoder_json, gpt2_vocab_bpe, opt, skip_bad_rows)
        with _context_encoder(workers, init) as encode:
            stats = {
                name: write_split(encode, tok, items, raw, tmp, name, max_contexts) for name, items in plan.items()
            }
        binarized = _binarize(raw, tmp, list(plan), srcdict, workers)
        shutil.rmtree(raw)
        summary = _summary(input_dir, final, spec, opt, keys, stats, binarized, time.time() - t0)
        (tmp / "tasks.json").write_text(json.dumps(_tasks_json(spec, opt, keys, stats), indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(format_summary(summary))
    return summary


def _binarize(raw: Path, out: Path, splits: list[str], srcdict: str | None, workers: int) -> dict:
    from fairseq.data import Dictionary

    dict_path = raw / "dict.txt"
    if srcdict:
        shutil.copyfile(srcdict, dict_path)
    elif "train" in splits:
        build_fairseq_dict([raw / f"train.{lang}" for lang in (SOURCE_LANG, TARGET_LANG)], dict_path, workers)
    else:
        raise ValueError("no train split to build a dictionary from; pass --srcdict (BART's dict.txt)")
    dictionary = Dictionary.load(str(dict_path))
    stats = {}
    for lang in (SOURCE_LANG, TARGET_LANG):
        shutil.copyfile(dict_path, out / f"dict.{lang}.txt")  # one joint dictionary (BART shares embeddings)
        for name in splits:
            prefix = out / f"{name}.{SOURCE_LANG}-{TARGET_LANG}.{lang}"
            stats[f"{name}.{lang}"] = binarize(raw / f"{name}.{lang}", dictionary, prefix, workers)
    return stats


def _tasks_json(spec: TokenizerSpec, opt: WindowOptions, keys: list[str], stats: dict) -> dict:
    """What the hyperdecoder_mrqa task reads: languages, tokenizer (to decode answers), datasets per split."""
    return {
        "format": "mrqa",
        "source_lang": SOURCE_LANG,
        "target_lang": TARGET_LANG,
        "tokenizer": spec.describe(),
        "windows": {"window": opt.window, "stride": opt.stride, "enabled": opt.windows},
        "tasks": {TASK_NAME: {"metrics": ["em", "f1"]}},
        "datasets": {
            BY_KEY[k].name: {
                "key": k,
                "domain": BY_KEY[k].domain,
                "split": ("valid_" if BY_KEY[k].domain == "in" else "test_") + k,
            }
            for k in keys
        },
        "splits": {name: s.windows for name, s in stats.items()},
    }


def _summary(input_dir, final: Path, spec, opt, keys, stats, binarized, seconds) -> dict:
    return {
        "dataset": "mrqa",
        "input_dir": str(Path(input_dir).resolve()),
        "output": str(final.resolve()),
        "tokenizer": spec.describe(),
        "windows": opt.__dict__,
        "datasets": keys,
        "splits": {name: s.info() for name, s in stats.items()},
        "binarized": binarized,
        "seconds": round(seconds, 3),
    }


def format_summary(summary: dict) -> str:
    lines = [f"[mrqa] -> {summary['output']}"]
    for name, s in summary["splits"].items():
        lines.append(
            f"  {name:<22} contexts {s['contexts']:>7}  questions {s['questions']:>7}  windows {s['windows']:>8}  "
            f"answered windows {s['answered_windows']:>8}  unanswerable questions {s['unanswerable_questions']:>6}"
            f"  skipped {s['skipped']:>4}"
        )
        for reason in s["skipped_examples"][:3]:
            lines.append(f"      skipped {reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seq2seq_preprocess.mrqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", required=True, help="folder with train/ and dev/ (MRQA download scripts)")
    p.add_argument("--output-dir", required=True, help="writes mrqa-bin/ here")
    p.add_argument("--gpt2-encoder-json", required=True)
    p.add_argument("--gpt2-vocab-bpe", required=True)
    p.add_argument("--srcdict", help="BART's dict.txt (ids then match the checkpoint)")
    p.add_argument("--datasets", help=f"comma list of keys (default all): {','.join(BY_KEY)}")
    p.add_argument("--window", type=int, default=512, help="tokens per source window, </s> included")
    p.add_argument("--stride", type=int, default=128, help="tokens shared by consecutive windows")
    p.add_argument("--no-windows", action="store_true", help="one source per question: its first window only")
    p.add_argument("--max-question-tokens", type=int, default=64)
    p.add_argument("--max-contexts", type=int, help="first N contexts of each file (smoke runs)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p


def run_cli(prog: str, call) -> int:
    """Exit code of a preprocessing CLI: 0, or 2 with `prog: error: ...` on stderr for bad data or flags."""
    try:
        call()
    except Seq2SeqFormatError as e:
        print(f"{prog}: error: {e}\n(fix the row, or pass --skip-bad-rows)", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("seq2seq_preprocess.mrqa", lambda: preprocess(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())
