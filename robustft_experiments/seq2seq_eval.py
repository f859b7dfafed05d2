"""Evaluation of the R3F-beyond-GLUE runs (issue 16): summaries generated with fairseq's sequence generator
under BART's decoding settings of the dataset, scored with ROUGE (`rouge-score`); XNLI accuracy per language;
and the table of ours next to the paper's numbers (benchmarks/quality/paper_numbers_seq2seq.json).

ROUGE conventions (stated, as datasets.md §9 asks): `rouge_score.rouge_scorer.RougeScorer` 0.1.2 with
`use_stemmer=True` (its tokenizer lowercases, turns every run of characters outside [a-z0-9] into a space,
Porter-stems tokens longer than 3 characters); ROUGE-1, ROUGE-2, ROUGE-L (whole-text LCS) and ROUGE-Lsum
(summary-level union LCS over sentences, the counterpart of files2rouge/Perl ROUGE-L that BART and R3F
report). Sentences for ROUGE-Lsum: a reference's own "\\n" breaks where the release has them (CNN/DM
highlights), otherwise the text is split after `.`, `!` or `?` followed by whitespace (`split_sentences`; an
abbreviation such as "U.S. " splits too, where nltk punkt, used by HF and PEGASUS, would not;
no nltk punkt download needed offline). Scores: the mean over examples of the F-measure, x100 (rouge-score's
BootstrapAggregator "mid" is the median of 1000 unseeded bootstrap means: the same up to sampling jitter).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
REPO = Path(__file__).resolve().parents[1]
PAPER_NUMBERS = REPO / "benchmarks" / "quality" / "paper_numbers_seq2seq.json"


# ------------------------------------------------------------------------------------------ ROUGE
def split_sentences(text: str) -> str:
    """Sentences on separate lines (what rougeLsum reads): the text's own line breaks when it has any,
    else a break after each `.`, `!`, `?` that is followed by whitespace."""
    text = text.strip()
    if "\n" in text:
        return "\n".join(line.strip() for line in text.split("\n") if line.strip())
    return "\n".join(s for s in _SENTENCE_END.split(text) if s)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F-measure x100 of ROUGE-1/2/L/Lsum over aligned hypothesis/reference pairs (see module doc)."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        # score(target, prediction): the reference comes first (rouge_scorer.py L109)
        scores = scorer.score(split_sentences(ref), split_sentences(hyp))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(hypotheses) for key, value in totals.items()}


ROUGE_SETTINGS = {
    "package": "rouge-score 0.1.2 (rouge_scorer.RougeScorer)",
    "use_stemmer": True,
    "tokenizer": "rouge-score default: lowercase, non-[a-z0-9] -> space, Porter stem on tokens > 3 chars",
    "rougeLsum_sentences": "reference line breaks, else split after . ! ? + whitespace",
    "aggregate": "mean F-measure x100 over examples",
}


# ------------------------------------------------------------------------------------------ loading
def _summary(data_bin: Path) -> dict:
    path = Path(data_bin) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; DATA must be a folder written by seq2seq_preprocess")
    return json.loads(path.read_text())


def _load(checkpoint: Path, data_bin: Path, cpu: bool):
    """(model in eval mode, task) of a checkpoint, with the task reading `data_bin`."""
    import torch
    from fairseq import checkpoint_utils

    import robustft  # noqa: F401  (registers the criterions / models the checkpoint names)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin)}
    )
    model = models[0].eval()
    if not cpu and torch.cuda.is_available():
        model = model.cuda().half()
    return model, task


def _batches(task, split: str, max_tokens: int, max_positions):
    task.load_dataset(split, combine=False)
    return task.get_batch_iterator(
        dataset=task.dataset(split),
        max_tokens=max_tokens,
        max_positions=max_positions,
        ignore_invalid_inputs=False,
        seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)


def _to_device(sample, model):
    from fairseq import utils

    device = next(model.parameters()).device
    return utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample


# ------------------------------------------------------------------------------------------ generation
def _gpt2_decoder(tokenizer: dict):
    if tokenizer.get("kind") != "gpt2":
        raise ValueError(f"summarisation data must be GPT-2 BPE (BART), got tokenizer {tokenizer}")
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe = get_encoder(tokenizer["gpt2_encoder_json"], tokenizer["gpt2_vocab_bpe"])
    return lambda ids: bpe.decode([int(t) for t in ids.split() if t.isdigit()])


def generate(
    checkpoint,
    data_bin,
    split: str = "test",
    *,
    overrides: dict | None = None,
    max_tokens: int = 4096,
    cpu: bool = False,
) -> list[str]:
    """Detokenized top-beam summaries of `split`, in example order, decoded with the dataset's BART settings
    (seq2seq_preprocess summary.json `generation`; `overrides` {beam, lenpen, max_len_b, min_len,
    no_repeat_ngram_size} replace single values)."""
    from fairseq.dataclass.configs import GenerationConfig

    data_bin = Path(data_bin)
    summary = _summary(data_bin)
    settings = {k: summary["generation"][k] for k in ("beam", "lenpen", "max_len_b", "min_len", "no_repeat_ngram_size")}
    settings.update(overrides or {})
    model, task = _load(Path(checkpoint), data_bin, cpu)
    generator = task.build_generator([model], GenerationConfig(**settings))
    decode = _gpt2_decoder(summary["tokenizer"])
    tgt_dict = task.target_dictionary
    out: dict[int, str] = {}
    for sample in _batches(task, split, max_tokens, model.max_positions()):
        sample = _to_device(sample, model)
        hypos = task.inference_step(generator, [model], sample)
        for i, sample_id in enumerate(sample["id"].tolist()):
            tokens = hypos[i][0]["tokens"].int().cpu()
            out[sample_id] = decode(tgt_dict.string(tokens)).strip()
    return [out[i] for i in range(len(out))]


def references(data_bin, split: str = "test") -> list[str]:
    """The ROUGE references of a split (`<split>.ref.jsonl`), in example order."""
    path = Path(data_bin) / f"{split}.ref.jsonl"
    return [json.loads(line)["ref"] for line in path.read_text(encoding="utf-8").splitlines()]


def evaluate_summarization(checkpoint, data_bin, split="test", out_dir=None, **kwargs) -> dict:
    """Generate, score, and (with out_dir) write `<split>.hyp` and `results.json`."""
    hyps = generate(checkpoint, data_bin, split, **kwargs)
    refs = references(data_bin, split)
    summary = _summary(Path(data_bin))
    result = {
        "dataset": summary["dataset"],
        "checkpoint": str(checkpoint),
        "split": split,
        "n": len(hyps),
        "generation": {**summary["generation"], **(kwargs.get("overrides") or {})},
        "rouge": rouge(hyps, refs),
        "rouge_settings": ROUGE_SETTINGS,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------ XNLI
def predict_classes(checkpoint, data_bin, splits: Sequence[str], *, max_tokens=8192, cpu=False) -> dict:
    """{split: (predicted class ids, gold class ids)} of a sentence-prediction checkpoint, example order."""
    import torch

    model, task = _load(Path(checkpoint), Path(data_bin), cpu)
    head = getattr(task.cfg, "classification_head_name", "sentence_classification_head")
    out = {}
    for split in splits:
        preds: dict[int, tuple[int, int]] = {}
        with torch.no_grad():
            for sample in _batches(task, split, max_tokens, model.max_positions()):
                sample = _to_device(sample, model)
                logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=head)
                # label dictionary ids -> class ids: fairseq's sentence_prediction subtracts nspecial
                gold = sample["target"].view(-1)
                for sample_id, p, g in zip(sample["id"].tolist(), logits.argmax(-1).tolist(), gold.tolist()):
                    preds[sample_id] = (p, g)
        ordered = [preds[i] for i in range(len(preds))]
        out[split] = ([p for p, _ in ordered], [g for _, g in ordered])
    return out


def evaluate_xnli(checkpoint, data_bin, out_dir=None, prefix="test", **kwargs) -> dict:
    """Accuracy x100 per language on `<prefix>_<lang>` and their unweighted mean (XNLI's "avg")."""
    data_bin = Path(data_bin)
    languages = sorted({p.name.split(".")[0][len(prefix) + 1 :] for p in (data_bin / "input0").glob(f"{prefix}_*.bin")})
    if not languages:
        raise ValueError(f"{data_bin}/input0: no {prefix}_<lang> splits (seq2seq_preprocess --dataset xnli)")
    predictions = predict_classes(checkpoint, data_bin, [f"{prefix}_{lang}" for lang in languages], **kwargs)
    accuracy = {
        lang: 100.0
        * sum(p == g for p, g in zip(*predictions[f"{prefix}_{lang}"]))
        / len(predictions[f"{prefix}_{lang}"][0])
        for lang in languages
    }
    result = {
        "dataset": "xnli",
        "checkpoint": str(checkpoint),
        "split": prefix,
        "accuracy": {**accuracy, "avg": statistics.fmean(accuracy.values())},
        "n": {lang: len(predictions[f"{prefix}_{lang}"][0]) for lang in languages},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps({k: v[0] for k, v in predictions.items()}) + "\n")
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------ report
def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict:
    return json.loads(Path(path).read_text())


def _mean(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def report(results: Sequence[dict], paper: dict | None = None) -> str:
    """Markdown: ours (mean ± sd over the results of each dataset x method) next to the paper's rows."""
    paper = paper or load_paper_numbers()
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r.get("method", "?")), []).append(r)
    lines = []
    summ = [k for k in groups if k[0] != "xnli"]
    if summ or paper.get("summarization"):
        table = paper["summarization"]
        lines += [
            f"## Summarisation: ROUGE-1 / ROUGE-2 / ROUGE-L ({table['metric_note']})",
            "",
            "| dataset | row | R-1 | R-2 | R-L | source |",
            "|---|---|---|---|---|---|",
        ]
        datasets = sorted({d for d, _ in summ} | {r["dataset"] for r in table["rows"]})
        for dataset in datasets:
            for row in (r for r in table["rows"] if r["dataset"] == dataset):
                paper_cells = " | ".join(f"{row[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL"))
                lines.append(f"| {dataset} | paper: {row['method']} | {paper_cells} | {table['source']} |")
            for (d, method), rs in sorted(groups.items()):
                if d != dataset:
                    continue
                cells = [_mean([r["rouge"][k] for r in rs]) for k in ("rouge1", "rouge2", "rougeLsum")]
                lines.append(f"| {dataset} | ours: {method} | {' | '.join(cells)} | rougeLsum as R-L |")
        lines.append("")
    xnli = {k: v for k, v in groups.items() if k[0] == "xnli"}
    if xnli or paper.get("xnli"):
        table = paper["xnli"]
        langs = table["languages"]
        lines += [
            f"## XNLI zero-shot test accuracy ({table['metric_note']})",
            "",
            "| row | " + " | ".join(langs) + " | avg |",
            "|---|" + "---|" * (len(langs) + 1),
        ]
        for row in table["rows"]:
            cells = [str(row.get(lang, "–")) for lang in langs]
            lines.append(f"| paper: {row['method']} | " + " | ".join(cells) + f" | {row['avg']} |")
        for (_, method), rs in sorted(xnli.items()):
            cells = [_mean([r["accuracy"][lang] for r in rs if lang in r["accuracy"]]) for lang in [*langs, "avg"]]
            lines.append(f"| ours: {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
