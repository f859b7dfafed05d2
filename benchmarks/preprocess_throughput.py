"""Throughput of `seq2seq_preprocess` on CNN/DailyMail-sized input (issue 16, item 5: >= 1,000 articles/s).

Writes a synthetic CNN/DM release in the HF 3.0.0 JSON-lines format (train.jsonl: 287,113 articles, the
real train size; validation.jsonl / test.jsonl: 13,368 / 11,490) whose articles have the real lengths
(~780 words in ~30 sentences, 3-4 highlights), over a Zipf-distributed vocabulary of 30k synthetic words;
trains a byte-level BPE stand-in for GPT-2's on a sample of it with HF `tokenizers` (50,000 merges +
the 256 byte symbols, written as encoder.json / vocab.bpe in GPT-2's format) and a BART-style dict.txt over
its ids; then times `preprocess("cnn_dm", ..., tokenizer="gpt2", srcdict=..., workers=W)` end to end
(read + tokenize + binarize) and writes `<out>/preprocess_throughput.{json,md}` with the load average.

    OMP_NUM_THREADS=1 python benchmarks/preprocess_throughput.py --workers 2 [--articles 287113] [--out DIR]

Real GPT-2 BPE gives ~1.3 tokens per English word; the stand-in's tokens per word are in the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CNN_DM_SIZES = {"train": 287113, "validation": 13368, "test": 11490}  # HF cnn_dailymail 3.0.0
BASE_ARTICLES = 4000  # distinct article bodies; each row gets its own dateline and id


def _vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct letter strings, shortest first (Zipf rank 1 = most frequent: short words are common)."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.linspace(2.0, 0.2, len(letters))
    weights /= weights.sum()
    lengths = rng.integers(2, 11, size=2 * n)
    chars = rng.choice(letters, size=int(lengths.sum()), p=weights).tolist()
    words, start = {}, 0
    for length in lengths.tolist():
        words.setdefault("".join(chars[start : start + length]), None)
        start += length
    unique = list(words)[:n]
    assert len(unique) == n
    return sorted(unique, key=len)


def _sentences(words: list[str], cdf: np.ndarray, n: int, rng: np.random.Generator) -> list[str]:
    out = []
    lengths = rng.integers(12, 36, size=n)
    all_ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))  # Zipf draws by inverse CDF
    start = 0
    for length in lengths.tolist():
        tokens = [words[i] for i in all_ids[start : start + length]]
        start += length
        tokens[0] = tokens[0].capitalize()
        if rng.random() < 0.3:
            tokens.insert(int(rng.integers(1, len(tokens))), str(int(rng.integers(1, 2000))))
        if rng.random() < 0.4:
            tokens[int(rng.integers(0, len(tokens) - 1))] += ","
        out.append(" ".join(tokens) + ".")
    return out


def write_release(root: Path, n_train: int, seed: int = 0) -> dict:
    """train/validation/test.jsonl of synthetic CNN/DM rows; returns size facts."""
    rng = np.random.default_rng(seed)
    words = _vocabulary(30000, rng)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    cdf = np.cumsum(zipf / zipf.sum())
    cdf[-1] = 1.0
    bodies = []
    for _ in range(BASE_ARTICLES):
        article = " ".join(_sentences(words, cdf, int(rng.integers(20, 40)), rng))
        highlights = "\n".join(s[:-1] + " ." for s in _sentences(words, cdf, int(rng.integers(3, 5)), rng))
        bodies.append((article, highlights))
    root.mkdir(parents=True, exist_ok=True)
    sizes = dict(CNN_DM_SIZES, train=n_train)
    n_words = 0
    for split, n in sizes.items():
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                article, highlights = bodies[(i * 7919) % BASE_ARTICLES]
                row = {
                    "article": f"CITY{i % 997}, Country (CNN) -- {article}",
                    "highlights": highlights,
                    "id": hashlib.sha1(f"{split}{i}".encode()).hexdigest(),
                }
                if i < 1000 and split == "train":
                    n_words += len(row["article"].split())
                f.write(json.dumps(row) + "\n")
    return {"articles": sizes, "mean_article_words": n_words / min(1000, n_train), "bodies": bodies}


def train_bpe_stand_in(texts: list[str], folder: Path, merges: int = 50000) -> dict:
    """A GPT-2-format byte-level BPE (encoder.json, vocab.bpe) trained on `texts`, and dict.txt over its ids."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(vocab_size=merges + len(alphabet), initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps(model["vocab"]))
    merge_lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merge_lines))
    n = len(model["vocab"])
    (folder / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(n)))
    return {
        "gpt2_encoder_json": str(folder / "encoder.json"),
        "gpt2_vocab_bpe": str(folder / "vocab.bpe"),
        "srcdict": str(folder / "dict.txt"),
    }


def python_speed() -> float:
    """CPU seconds of 2M dict lookups in a Python loop: this machine's speed at the moment (a quiet modern core
    takes ~0.1 s; a contended one several times that), recorded beside the throughput."""
    table = {str(i): i for i in range(30000)}
    keys = [str(i % 30000) for i in range(2_000_000)]
    start, get = time.process_time(), table.get
    for key in keys:
        get(key)
    return round(time.process_time() - start, 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--articles", type=int, default=CNN_DM_SIZES["train"], help="train articles (default: CNN/DM's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tmp", help="work folder (default: a temp dir, removed)")
    args = p.parse_args(argv)

    from seq2seq_preprocess import preprocess

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        work = Path(tmp)
        t0 = time.time()
        facts = write_release(work / "cnn_dm", args.articles)
        bodies = facts.pop("bodies")
        files = train_bpe_stand_in([a for a, _ in bodies[:2000]], work / "bpe")
        setup_s = time.time() - t0
        speed_before = python_speed()
        load_before = os.getloadavg()
        start, cpu_start = time.time(), time.process_time()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = preprocess(
            "cnn_dm", work / "cnn_dm", work / "out", "gpt2", workers=args.workers, log=lambda s: None, **files
        )
        wall = time.time() - start
        cpu = time.process_time() - cpu_start
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
        speed_after = python_speed()
        rows = summary["rows_written"]
        source = summary["binarized"]["train.source"]
        train_tokens = source["tokens"] - source["sequences"]  # without </s>
        result = {
            "articles": rows,
            "wall_s": round(wall, 1),
            "articles_per_s": round(rows / wall, 1),
            "train_articles_per_s": round(facts["articles"]["train"] / wall, 1),
            "read_s": summary["read_seconds"],
            "tokenize_and_binarize_s": summary["tokenize_and_binarize_seconds"],
            "process_cpu_s": round(cpu, 1),
            "workers_cpu_s": round(
                children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime, 1
            ),
            "python_2m_dict_gets_cpu_s": [speed_before, speed_after],
            "workers": args.workers,
            "mean_article_words": round(facts["mean_article_words"], 1),
            "tokens_per_word": round(train_tokens / (facts["articles"]["train"] * facts["mean_article_words"]), 3),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "cpus": os.cpu_count(),
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            "setup_s": round(setup_s, 1),
            "binarizer": summary["binarizer"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python benchmarks/preprocess_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "met" if result["articles_per_s"] >= 1000 else "MISSED"
    md = (
        f"seq2seq_preprocess on synthetic CNN/DM ({rows} articles incl. validation/test, "
        f"{result['mean_article_words']} words per article, {result['tokens_per_word']} BPE tokens per word), "
        f"`--workers {args.workers}`, {result['machine']}, load average {result['load_average_before']} before / "
        f"{result['load_average_after']} after, Python speed (CPU s of 2M dict lookups, ~0.1 on a quiet core) "
        f"{result['python_2m_dict_gets_cpu_s']}; {result['date']}\n\n"
        f"| wall s | articles/s | read s | tokenize + binarize s | CPU s main / workers | target >= 1000/s |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {result['wall_s']} | {result['articles_per_s']} | {result['read_s']} | "
        f"{result['tokenize_and_binarize_s']} | {result['process_cpu_s']} / {result['workers_cpu_s']} | {verdict} |\n"
    )
    (out / "preprocess_throughput.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
