"""XSum (Narayan et al. 2018): BBC articles with their one-sentence introduction as the summary.

Rows as the HF `xsum` 1.2.0 / GEM loaders read the released archive (datasets.md §2b): per id of the
official split file, `bbc-summary-data/<id>.summary`; lines that are empty or BBC share-widget boilerplate
are dropped; `[SN]FIRST-SENTENCE[SN]` is the summary, `[SN]RESTBODY[SN]` the document (one paragraph per
line; joined by " " here, one example per line, datasets.md §2d). No row is dropped (HF keeps all).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..records import (
    Example,
    Rows,
    Seq2SeqFormatError,
    SplitData,
    add_stripped_pair,
    find_split_files,
    first_existing,
    json_strs,
    jsonl_splits,
    one_line,
    paired_splits,
    read_text,
    split_lines,
)
from ..registry import XSUM_KWARGS, Dataset, Format, ReadOptions, register

SPLIT_FILE = "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
SPLIT_FILE_PLACES = (SPLIT_FILE, f"XSum-Dataset/{SPLIT_FILE}")
SPLIT_KEYS = {"train": "train", "valid": "validation", "test": "test"}  # the file's key is "validation"
SUMMARY_DIR = "bbc-summary-data"
# HF gem/xsum loader _REMOVE_LINES: the BBC page's share widget, left in the extracted text
BOILERPLATE = frozenset(
    (
        "Share this with",
        "Email",
        "Facebook",
        "Messenger",
        "Twitter",
        "Pinterest",
        "WhatsApp",
        "Linkedin",
        "LinkedIn",
        "Copy this link",
        "These are external links and will open in a new window",
    )
)
SECTIONS = ("URL", "TITLE", "FIRST-SENTENCE", "RESTBODY")


def parse_summary_file(text: str) -> dict[str, list[str]] | str:
    """{section: its non-empty, non-boilerplate lines}, or the reason the file is malformed."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in split_lines(text):
        if line in BOILERPLATE or not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith("[SN]") and stripped.endswith("[SN]") and len(stripped) > 8:
            current = stripped[4:-4]
            sections[current] = []
        elif current is None:
            return "text before the first [SN]...[SN] section marker"
        else:
            sections[current].append(stripped)
    missing = [s for s in ("FIRST-SENTENCE", "RESTBODY") if s not in sections]
    if missing:
        return f"no [SN]{missing[0]}[SN] section (markers found: {', '.join(sections) or 'none'})"
    return sections


def _split_ids(path: Path) -> dict[str, list]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise Seq2SeqFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in SPLIT_KEYS.values()):
        raise Seq2SeqFormatError(f"{path}:1: expected an object with lists 'train', 'validation', 'test' of BBC ids")
    return data


def _detect_summary(root: Path) -> bool:
    return (root / SUMMARY_DIR).is_dir() and first_existing(root, SPLIT_FILE_PLACES) is not None


def _read_summary(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    split_file = first_existing(root, SPLIT_FILE_PLACES)
    if split_file is None:
        raise FileNotFoundError(f"{root}: no {SPLIT_FILE} (the official split, from the XSum repository)")
    ids = _split_ids(split_file)
    out = {}
    for split, key in SPLIT_KEYS.items():
        rows = Rows(split, options.skip_bad_rows)
        rows.read_file(split_file)
        for i, bbc_id in enumerate(ids[key]):
            rows.data.rows_read += 1
            where = f"{split_file}: {key}[{i}]"
            path = root / SUMMARY_DIR / f"{bbc_id}.summary"
            if not path.is_file():
                rows.bad(where, f"id {bbc_id!r} has no file {path}")
                continue
            parsed = parse_summary_file(read_text(path))
            if isinstance(parsed, str):
                rows.bad(f"{path}:1", parsed)
                continue
            document = " ".join(parsed["RESTBODY"])
            rows.add(Example((document,), " ".join(parsed["FIRST-SENTENCE"]), f"{path}:1", str(bbc_id)))
        out[split] = rows.data
    return out


def _read_jsonl(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    """HF `xsum` exported: {"document", "summary", "id"}; the document keeps "\\n" between paragraphs."""

    def add(rows: Rows, where: str, obj: dict) -> None:
        fields = json_strs(obj, ("document", "summary"), where, rows)
        if fields is not None:
            rows.add(Example((one_line(fields[0]),), one_line(fields[1]), where, str(obj.get("id", ""))))

    return jsonl_splits(root, options.skip_bad_rows, add, ("{split}.jsonl", "{split}.json"))


def _read_source_target(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    """The old HF tarball / BART layout: xsum/{train,val,test}.{source,target}, one example per line."""
    base = root / "xsum" if (root / "xsum").is_dir() else root
    return paired_splits(
        base, options.skip_bad_rows, "{split}.source", lambda s: s.with_suffix(".target"), add_stripped_pair
    )


def _has_source(root: Path) -> bool:
    base = root / "xsum" if (root / "xsum").is_dir() else root
    return "train" in find_split_files(base, ("{split}.source",))


register(
    Dataset(
        name="xsum",
        kind="summarization",
        formats=(
            Format(
                "summary",
                f"{SUMMARY_DIR}/<id>.summary and {SPLIT_FILE} (or XSum-Dataset/{SPLIT_FILE})",
                _detect_summary,
                _read_summary,
            ),
            Format(
                "jsonl",
                "{train,validation,test}.jsonl with document, summary, id",
                lambda root: "train" in find_split_files(root, ("{split}.jsonl", "{split}.json")),
                _read_jsonl,
            ),
            Format("source_target", "[xsum/]{train,val,test}.{source,target}", _has_source, _read_source_target),
        ),
        download=(
            "http://bollin.inf.ed.ac.uk/public/direct/XSUM-EMNLP18-Summary-Data-Original.tar.gz (bbc-summary-data/) "
            f"+ {SPLIT_FILE} from https://github.com/EdinburghNLP/XSum (XSum-Dataset/); or HF `xsum` exported "
            "with Dataset.to_json"
        ),
        description="XSum extreme summarisation, official split 204,045 / 11,332 / 11,334",
        generation=XSUM_KWARGS,
    )
)
