"""WikiLingua, English (Ladhak et al. 2020), as GEM `wiki_lingua_english_en` has it (datasets.md §5):
one WikiHow section per row, `source` -> `target`. Files: GEM's `english/{train,val,test}.{src,tgt}.en`, or
the GEM dataset exported to JSON lines (`source`, `target`, `references`, `gem_id`)."""

from __future__ import annotations

from pathlib import Path

from ..records import (
    Example,
    Rows,
    SplitData,
    add_stripped_pair,
    find_split_files,
    json_strs,
    jsonl_splits,
    one_line,
    paired_splits,
)
from ..registry import Dataset, Format, Generation, ReadOptions, register

# allenai/hyperdecoders tasks.py L1143: max_length 60, num_beams 4 (its min_length is overridden to 2)
WIKILINGUA_KWARGS = Generation(
    4, 1.0, 60, 2, 3, "Hyperdecoders task_specific_config (tasks.py L1143): 60 / 4 beams, min 2"
)


def _base(root: Path) -> Path:
    return root / "english" if (root / "english").is_dir() else root


def _read_lines(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    def target_of(source: Path) -> Path:
        return source.with_name(source.name.replace(".src.en", ".tgt.en"))

    return paired_splits(_base(root), options.skip_bad_rows, "{split}.src.en", target_of, add_stripped_pair)


def _read_jsonl(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    def add(rows: Rows, where: str, obj: dict) -> None:
        fields = json_strs(obj, ("source", "target"), where, rows)
        if fields is not None:
            rows.add(Example((one_line(fields[0]),), one_line(fields[1]), where, str(obj.get("gem_id", ""))))

    return jsonl_splits(root, options.skip_bad_rows, add)


register(
    Dataset(
        name="wikilingua",
        aliases=("wiki_lingua", "wiki_lingua_english_en"),
        kind="summarization",
        formats=(
            Format(
                "gem",
                "[english/]{train,val,test}.{src,tgt}.en",
                lambda root: "train" in find_split_files(_base(root), ("{split}.src.en",)),
                _read_lines,
            ),
            Format(
                "jsonl",
                "{train,validation,test}.jsonl with source, target (GEM wiki_lingua_english_en exported)",
                lambda root: "train" in find_split_files(root, ("{split}.jsonl",)),
                _read_jsonl,
            ),
        ),
        download=(
            "GEM `wiki_lingua_english_en` (HF `gem` dataset; its files english/{train,val,test}.{src,tgt}.en), from "
            "https://github.com/esdurmus/Wikilingua"
        ),
        description="WikiLingua English section summaries (GEM split 99,020 / 13,823 / 28,614)",
        generation=WIKILINGUA_KWARGS,
    )
)
