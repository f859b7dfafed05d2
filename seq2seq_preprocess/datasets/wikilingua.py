"""WikiLingua, English (Ladhak et al. 2020), as GEM `wiki_lingua_english_en` has it (datasets.md §5):
one WikiHow section per row, `source` -> `target`. Files: GEM's `english/{train,val,test}.{src,tgt}.en`, or
the GEM dataset exported to JSON lines (`source`, `target`, `references`, `gem_id`)."""

from __future__ import annotations

from pathlib import Path

from ..records import Example, Rows, SplitData, find_split_files, iter_jsonl, iter_paired_lines, json_str, one_line
from ..registry import Dataset, Format, Generation, ReadOptions, register

# allenai/hyperdecoders tasks.py L1143: max_length 60, num_beams 4 (its min_length is overridden to 2)
WIKILINGUA_KWARGS = Generation(
    4, 1.0, 60, 2, 3, "Hyperdecoders task_specific_config (tasks.py L1143): 60 / 4 beams, min 2"
)


def _base(root: Path) -> Path:
    return root / "english" if (root / "english").is_dir() else root


def _read_lines(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    out = {}
    for split, source in find_split_files(_base(root), ("{split}.src.en",)).items():
        rows = Rows(split, options.skip_bad_rows)
        target = source.with_name(source.name.replace(".src.en", ".tgt.en"))
        for where, src, tgt in iter_paired_lines(source, target, rows):
            rows.add(Example((src.strip(),), tgt.strip(), where))
        out[split] = rows.data
    return out


def _read_jsonl(root: Path, options: ReadOptions) -> dict[str, SplitData]:
    out = {}
    for split, path in find_split_files(root, ("{split}.jsonl",)).items():
        rows = Rows(split, options.skip_bad_rows)
        for where, obj in iter_jsonl(path, rows):
            source = json_str(obj, "source", where, rows)
            target = json_str(obj, "target", where, rows) if source is not None else None
            if source is not None and target is not None:
                rows.add(Example((one_line(source),), one_line(target), where, str(obj.get("gem_id", ""))))
        out[split] = rows.data
    return out


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
