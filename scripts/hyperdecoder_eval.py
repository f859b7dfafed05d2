#!/usr/bin/env python
"""Evaluate a hyperdecoder (or any fairseq seq2seq) checkpoint on multi-task text-to-text data.

    python scripts/hyperdecoder_eval.py CHECKPOINT DATA_DIR [--split valid] [--beam 1] [--json R] [--predictions P]

The task follows DATA_DIR/tasks.json `format`:
- `text2text` (glue_preprocess --format text2text): GLUE metrics per task and their average; `--predictions`
  writes `id<TAB>task<TAB>prediction<TAB>gold` lines.
- `mrqa` (python -m seq2seq_preprocess.mrqa): every window's answer and mean token NLL, the lowest-NLL
  non-empty answer per question, official EM/F1 per dataset and the in-/out-of-domain averages;
  `--predictions` writes the reference's `{qid: [[answer, nll], ...]}` (allenai/hyperdecoders mrqa_eval/eval.py).
- `text2text_mixture` (python -m seq2seq_preprocess.mixture): ROUGE or accuracy per task, each task decoded
  with its own settings (tasks.json) unless --beam / --max-len-b are given; `--predictions` writes JSON lines.

`--split valid` (default) scores every `valid_<task>` split at once, `--split valid_rte` one; with the
training run's `--split-validation-test` (or this script's), `test_<name>` is the held-out half of `valid_<name>`.
"""

import argparse
import json
import logging
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_BY_FORMAT = {
    "text2text": "hyperdecoder_glue",
    "mrqa": "hyperdecoder_mrqa",
    "text2text_mixture": "hyperdecoder_text2text",
}
DEFAULT_MAX_LEN_B = {"hyperdecoder_glue": 16, "hyperdecoder_mrqa": 64}  # reference target lengths (answers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="binarized multi-task folder with tasks.json")
    p.add_argument("--split", default="valid", help="valid (all tasks), valid_<task>, test, test_<task>, ...")
    p.add_argument("--beam", type=int, help="beam size (default: greedy, as the reference; mixture: per task)")
    p.add_argument("--max-len-b", type=int, help="max generated tokens (default: GLUE 16, MRQA 64; mixture: per task)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bpe", default="auto", help="auto (from tasks.json), none, gpt2, sentencepiece, wordpiece")
    p.add_argument(
        "--bpe-args",
        default="{}",
        help='JSON, e.g. \'{"gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}\'',
    )
    p.add_argument("--split-validation-test", action="store_true", help="halve dev splits as in training")
    p.add_argument("--user-dir", default=os.path.join(REPO, "hyperdecoder_src"))
    p.add_argument("--cpu", action="store_true", help="evaluate on CPU even when CUDA is available")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--predictions", help="also write every prediction to this file (format: see above)")
    return p.parse_args(argv)


def task_name(data: str) -> str:
    path = os.path.join(data, "tasks.json")
    fmt = "text2text"
    if os.path.exists(path):
        with open(path) as f:
            fmt = json.load(f).get("format", fmt)
    if fmt not in TASK_BY_FORMAT:
        raise SystemExit(f"{path}: unknown format {fmt!r}; expected one of {', '.join(TASK_BY_FORMAT)}")
    return TASK_BY_FORMAT[fmt]


def generation_args(args, name: str) -> dict:
    given = {"beam": args.beam, "max_len_b": args.max_len_b}
    if name == "hyperdecoder_text2text":  # per-task settings, replaced only by what is given
        return {k: v for k, v in given.items() if v is not None}
    return {"beam": args.beam or 1, "max_len_a": 0, "max_len_b": args.max_len_b or DEFAULT_MAX_LEN_B[name]}


def load(args):
    from fairseq import checkpoint_utils, tasks, utils
    from fairseq.tasks import TASK_REGISTRY
    from omegaconf import open_dict

    utils.import_user_module(argparse.Namespace(user_dir=args.user_dir))
    name = task_name(args.data)
    state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
    cfg = state["cfg"]  # the training config: dataset/task settings (padding side, lengths) carry over
    with open_dict(cfg):
        cfg.task._name = name
        cfg.task.data = args.data
        cfg.task.hyperdecoder_eval_bpe = args.bpe
        cfg.task.hyperdecoder_eval_bpe_args = args.bpe_args
        cfg.task.hyperdecoder_eval_args = json.dumps(generation_args(args, name))
        cfg.task.hyperdecoder_print_samples = False
        cfg.task.split_validation_test = args.split_validation_test or cfg.task.get("split_validation_test", False)
        cfg.task[TASK_REGISTRY[name].EVAL_FLAG] = True
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([args.checkpoint], task=task, state=state)
    return task, models[0]


def evaluate(args):
    """(task, report dict, per-example records) of the checkpoint on `args.split`."""
    from fairseq import utils

    task, model = load(args)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        model.cuda()
    model.eval()
    task.load_dataset(args.split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(args.split),
        max_sentences=args.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
    ).next_epoch_itr(shuffle=False)
    scorer, records = task.new_scorer(), []
    with torch.no_grad():
        for sample in itr:
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            task.score_batch(sample, model, scorer, records)
    return task, task.report(scorer), records


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    task, report, records = evaluate(args)
    if args.predictions:
        task.write_predictions(records, args.predictions)
    print(f"{args.checkpoint} on {args.data} [{args.split}]")
    print(task.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, **report}, f, indent=2)


if __name__ == "__main__":
    main()
