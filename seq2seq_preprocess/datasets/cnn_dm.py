"""CNN / DailyMail (Hermann et al. 2015; the non-anonymised version of See et al. 2017), four release formats.

Rows, as the HF `cnn_dailymail` 3.0.0 loader has them (datasets.md §1): article lines joined by " ",
highlights each fixed by `fix_missing_period` (" ." appended when a line lacks an end token); stories with
no article text or no highlights are dropped (114 in train). Target = highlights joined by " " (BART's
`train.target`, datasets.md §1d); ROUGE reference = highlights joined by "\\n" (rougeLsum splits on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..records import (
    Example,
    Rows,
    SplitData,
    find_split_files,
    iter_csv,
    json_strs,
    jsonl_splits,
    one_line,
    paired_splits,
    read_text,
    split_lines,
)
from ..registry import CNN_KWARGS, Dataset, Format, ReadOptions, register

# abisee/cnn-dailymail make_datafiles.py L11-13 (the tokens that already end a sentence)
END_TOKENS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")
STORY_DIRS = ("cnn/stories", "dailymail/stories")
URL_LISTS = {"train": "all_train.txt", "valid": "all_val.txt", "test": "all_test.txt"}


def fix_missing_period(line: str) -> str:
    """abisee make_datafiles.py L109-115: a line without an end token gets " ." (space, then period)."""
    if "@highlight" in line or line == "" or line[-1] in END_TOKENS:
        return line
    return line + " ."


def parse_story(text: str) -> tuple[list[str], list[str]]:
    """(article lines, highlight lines) of a .story file: lines stripped, empty ones dropped; every line after
    the first `@highlight` is highlight text (the flag never resets, as in every reference parser)."""
    article: list[str] = []
    highlights: list[str] = []
    in_highlights = False
    for raw in split_lines(text):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("@highlight"):
            in_highlights = True
            continue
        (highlights if in_highlights else article).append(fix_missing_period(line))
    return article, highlights


def url_hash(url: str) -> str:
    """Story file stem: lowercase hex SHA1 of the URL (abisee make_datafiles.py L98-106)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def _add(rows: Rows, where: str, article: str, highlights: list[str], story_id: str) -> None:
    """One row, as HF 3.0.0 keeps it: an empty article or no highlights drops the story (not an error)."""
    if not article.strip():
        rows.drop("empty article")
        return
    highlights = [h.strip() for h in highlights if h.strip()]
    if not highlights:
        rows.drop("no highlights")
        return
    rows.add(Example((article,), " ".join(highlights), where, story_id, reference="\n".join(highlights)))


# ------------------------------------------------------------------------------ .story files + url lists
def _story_root(root: Path) -> Path:
    return root / "url_lists"


def _detect_stories(root: Path) -> bool:
    return (_story_root(root) / URL_LISTS["train"]).is_file() and any((root / d).is_dir() for d in STORY_DIRS)


def _read_stories(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    dirs = [root / d for d in STORY_DIRS if (root / d).is_dir()]
    out = {}
    for split, name in URL_LISTS.items():
        url_list = _story_root(root) / name
        if not url_list.is_file():
            continue
        rows = Rows(split, options.skip_bad_rows)
        rows.read_file(url_list)
        for lineno, url in enumerate(split_lines(read_text(url_list)), start=1):
            where = f"{url_list}:{lineno}"
            url = url.strip()
            if not url:
                continue
            rows.data.rows_read += 1
            stem = url_hash(url)
            story = next((d / f"{stem}.story" for d in dirs if (d / f"{stem}.story").is_file()), None)
            if story is None:
                rows.bad(where, f"no story file {stem}.story under {' or '.join(str(d) for d in dirs)}")
                continue
            article, highlights = parse_story(read_text(story))
            _add(rows, f"{story}:1", " ".join(article), highlights, stem)
        out[split] = rows.data
    return out


# ------------------------------------------------------------------------------ HF-style JSON lines / CSV
def _from_record(rows: Rows, where: str, article: str, highlights: str, story_id: str) -> None:
    # HF 3.0.0 joins highlights with "\n" (1.0.0 with " "): the lines are the reference sentences
    _add(rows, where, one_line(article), highlights.split("\n"), story_id)


def _read_jsonl(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    def add(rows: Rows, where: str, obj: dict) -> None:
        fields = json_strs(obj, ("article", "highlights"), where, rows)
        if fields is not None:
            _from_record(rows, where, fields[0], fields[1], str(obj.get("id", "")))

    return jsonl_splits(root, options.skip_bad_rows, add, ("{split}.jsonl", "{split}.json"))


def _read_csv(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    out = {}
    for split, path in find_split_files(root, ("{split}.csv",)).items():
        rows = Rows(split, options.skip_bad_rows)
        for where, rec in iter_csv(path, rows, ("article", "highlights")):
            _from_record(rows, where, rec["article"], rec["highlights"], "")
        out[split] = rows.data
    return out


# ------------------------------------------------------------------------------ BART's train.source/.target
def _read_source_target(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    """BART's files: one example per line, highlights already joined by " " (no sentence boundaries: the
    ROUGE reference is split into sentences at evaluation, like the hypotheses)."""

    def add(rows: Rows, where: str, src: str, tgt: str) -> None:
        if not src.strip():
            rows.drop("empty article")  # AM keeps the 114 empty-article stories as empty lines
        elif not tgt.strip():
            rows.drop("no highlights")
        else:
            rows.add(Example((src.strip(),), tgt.strip(), where))

    return paired_splits(root, options.skip_bad_rows, "{split}.source", lambda s: s.with_suffix(".target"), add)


def _has(*patterns: str):
    return lambda root: "train" in find_split_files(root, patterns)


register(
    Dataset(
        name="cnn_dm",
        aliases=("cnn_dailymail", "cnndm"),
        kind="summarization",
        formats=(
            Format(
                "stories",
                "url_lists/all_{train,val,test}.txt and cnn/stories/, dailymail/stories/ (*.story)",
                _detect_stories,
                _read_stories,
            ),
            Format(
                "jsonl",
                "{train,validation,test}.jsonl with article, highlights, id",
                _has("{split}.jsonl", "{split}.json"),
                _read_jsonl,
            ),
            Format(
                "csv", "{train,validation,test}.csv with header id,article,highlights", _has("{split}.csv"), _read_csv
            ),
            Format(
                "source_target",
                "{train,val,test}.{source,target} (fairseq BART's cnn_dm/ files)",
                _has("{split}.source"),
                _read_source_target,
            ),
        ),
        download=(
            "stories: https://cs.nyu.edu/~kcho/DMQA/ (cnn_stories.tgz, dailymail_stories.tgz) + url_lists/ from "
            "https://github.com/abisee/cnn-dailymail; BART's source/target files: run "
            "https://github.com/artmatsak/cnn-dailymail (fairseq examples/bart/README.summarization.md); "
            "jsonl: HF `cnn_dailymail` 3.0.0 exported with Dataset.to_json; csv: the Kaggle "
            "'CNN-DailyMail News Text Summarization' copy"
        ),
        description="CNN/DailyMail news summarisation (R3F Table 4), 287,113 / 13,368 / 11,490 rows (HF 3.0.0)",
        generation=CNN_KWARGS,
    )
)
