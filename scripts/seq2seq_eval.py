#!/usr/bin/env python
"""Evaluate R3F-beyond-GLUE runs (library: robustft_experiments/seq2seq_eval.py).

# summaries with the dataset's BART decoding settings, then ROUGE-1/2/L/Lsum
python scripts/seq2seq_eval.py summarize --checkpoint CKPT --data cnn_dm-bin --out OUT [--split test]
    [--method r3f_seq2seq --seed 1] [--beam 4 --lenpen 2.0 --max-len-b 140 --min-len 55 --no-repeat-ngram-size 3]
# XNLI: accuracy per language on test_<lang> and the average
python scripts/seq2seq_eval.py xnli --checkpoint CKPT --data xnli-bin --out OUT [--method r3f --seed 1]
# ours (mean ± sd over seeds) next to the paper's numbers
python scripts/seq2seq_eval.py report OUT1/results.json OUT2/results.json ... [--out table.md]
"""

import argparse
import json
import sys
from pathlib import Path

from robustft_experiments import seq2seq_eval

GENERATION_FLAGS = (
    ("--beam", int),
    ("--lenpen", float),
    ("--max-len-b", int),
    ("--min-len", int),
    ("--no-repeat-ngram-size", int),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("summarize", "xnli"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", required=True)
        s.add_argument("--data", required=True, help="the <dataset>-bin folder of seq2seq_preprocess")
        s.add_argument("--out", required=True, help="writes results.json (+ <split>.hyp / predictions.json)")
        s.add_argument("--method", default="?", help="recorded in results.json for the report")
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--max-tokens", type=int, default=4096)
        s.add_argument("--cpu", action="store_true")
    summarize = sub.choices["summarize"]
    summarize.add_argument("--split", default="test")
    for flag, kind in GENERATION_FLAGS:
        summarize.add_argument(flag, type=kind, help="override the dataset's BART decoding setting")
    rep = sub.add_parser("report")
    rep.add_argument("results", nargs="+", help="results.json files")
    rep.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)

    if args.command == "report":
        table = seq2seq_eval.report([json.loads(Path(r).read_text()) for r in args.results])
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    common = {"out_dir": args.out, "max_tokens": args.max_tokens, "cpu": args.cpu}
    if args.command == "summarize":
        overrides = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f, _ in GENERATION_FLAGS}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        result = seq2seq_eval.evaluate_summarization(
            args.checkpoint, args.data, args.split, overrides=overrides, **common
        )
    else:
        result = seq2seq_eval.evaluate_xnli(args.checkpoint, args.data, **common)
    result.update(method=args.method, seed=args.seed)
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("dataset", "method", "n") if k in result}
            | {"scores": result.get("rouge") or result.get("accuracy")},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
