#!/usr/bin/env python
"""Evaluate a hyperdecoder (or any fairseq seq2seq) checkpoint on text-to-text GLUE dev data.

    python scripts/hyperdecoder_eval.py CHECKPOINT DATA_DIR [--split valid_rte] [--beam 1] [--cpu]

DATA_DIR is glue_preprocess's `text2text-bin/`. `--split valid` (default) scores every task's
`valid_<task>` split; `--split valid_rte` one task. Prints one row per task (n, invalid answers,
GLUE metrics x100) and the average (per-task means averaged), and with --json writes them too.
"""

import argparse
import json
import logging
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="text2text-bin/ directory (glue_preprocess --format text2text)")
    p.add_argument("--split", default="valid", help="valid (all tasks), valid_<task>, test_<task>, ...")
    p.add_argument("--beam", type=int, default=1, help="beam size (the reference decodes greedily)")
    p.add_argument("--max-len-b", type=int, default=16, help="max generated tokens per answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bpe", default="auto", help="auto (from tasks.json), none, gpt2, sentencepiece, wordpiece")
    p.add_argument(
        "--bpe-args",
        default="{}",
        help='JSON, e.g. \'{"gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}\'',
    )
    p.add_argument("--user-dir", default=os.path.join(REPO, "hyperdecoder_src"))
    p.add_argument("--cpu", action="store_true", help="evaluate on CPU even when CUDA is available")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--predictions", help="also write `id<TAB>task<TAB>prediction<TAB>gold` lines to this file")
    return p.parse_args(argv)


def evaluate(args):
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(argparse.Namespace(user_dir=args.user_dir))
    from fairseq import tasks
    from omegaconf import open_dict

    from hyperdecoder_src import glue_scoring

    state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
    cfg = state["cfg"]  # the training config: dataset/task settings (padding side, lengths) carry over
    with open_dict(cfg):
        cfg.task._name = "hyperdecoder_glue"
        cfg.task.data = args.data
        cfg.task.hyperdecoder_eval_glue = True
        cfg.task.hyperdecoder_eval_bpe = args.bpe
        cfg.task.hyperdecoder_eval_bpe_args = args.bpe_args
        cfg.task.hyperdecoder_eval_args = json.dumps({"beam": args.beam, "max_len_a": 0, "max_len_b": args.max_len_b})
        cfg.task.hyperdecoder_print_samples = False
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([args.checkpoint], task=task, state=state)
    model = models[0]
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        model.cuda()
    model.eval()
    # the generator was built for the model before its weights were loaded: same object, so fine
    task.load_dataset(args.split)
    dataset = task.dataset(args.split)
    itr = task.get_batch_iterator(
        dataset=dataset,
        max_sentences=args.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
    ).next_epoch_itr(shuffle=False)
    scorer = glue_scoring.GlueScorer(task.label_words)
    records = []
    with torch.no_grad():
        for sample in itr:
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            task.score_batch(sample, model, scorer, records)
    if args.predictions:
        with open(args.predictions, "w") as f:
            f.writelines(f"{i}\t{t}\t{p}\t{g}\n" for i, t, p, g in sorted(records))
    per_task = glue_scoring.scores_from_counts(scorer.counts, scorer.pairs)
    return per_task, glue_scoring.glue_average(per_task)


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    per_task, avg = evaluate(args)
    from hyperdecoder_src.glue_scoring import format_table

    print(f"{args.checkpoint} on {args.data} [{args.split}], beam {args.beam}")
    print(format_table(per_task))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, "tasks": per_task, "avg": avg}, f, indent=2)


if __name__ == "__main__":
    main()
