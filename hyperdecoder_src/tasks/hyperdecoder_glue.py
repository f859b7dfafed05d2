"""`hyperdecoder_glue`: fairseq `translation` on glue_preprocess's text-to-text GLUE data, whose
validation generates each example's answer and logs every task's GLUE metric plus their average."""

import glob
import json
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq import utils
from fairseq.data import BaseWrapperDataset, ConcatDataset, LanguagePairDataset, encoders
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask, load_langpair_dataset

from robustft_common.validation import require

from .. import glue_scoring
from ..glue_scoring import TASKS, GlueScorer, count_keys, pairs_key

logger = logging.getLogger(__name__)


@dataclass
class HyperdecoderGlueConfig(TranslationConfig):
    hyperdecoder_eval_glue: bool = field(
        default=False,
        metadata={
            "help": "generate during validation and log each task's GLUE metric "
            "(<task>_<metric>) and their average (glue_avg)"
        },
    )
    hyperdecoder_eval_args: str = field(
        default='{"beam": 1, "max_len_a": 0, "max_len_b": 16}',
        metadata={"help": "generation args (JSON) for validation; the reference decodes greedily"},
    )
    hyperdecoder_eval_bpe: str = field(
        default="auto",
        metadata={
            "help": "how to turn generated tokens into text: auto (from the data's "
            "tasks.json), none, gpt2, sentencepiece, wordpiece"
        },
    )
    hyperdecoder_eval_bpe_args: str = field(
        default="{}",
        metadata={
            "help": "JSON args of that BPE, e.g. "
            '\'{"gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}\''
        },
    )
    hyperdecoder_print_samples: bool = field(default=False, metadata={"help": "log one prediction per batch"})


class GlueLabelsDataset(BaseWrapperDataset):
    """Adds each example's task index and gold label (from <split>.task / <split>.gold) to its batch."""

    def __init__(self, dataset, task_ids: np.ndarray, golds: np.ndarray):
        super().__init__(dataset)
        assert len(task_ids) == len(golds) == len(dataset), (len(task_ids), len(golds), len(dataset))
        self.task_ids, self.golds = task_ids, golds

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if batch:
            ids = batch["id"].numpy()
            batch["glue_task"] = torch.from_numpy(self.task_ids[ids])
            batch["glue_gold"] = torch.from_numpy(self.golds[ids])
        return batch


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@register_task("hyperdecoder_glue", dataclass=HyperdecoderGlueConfig)
class HyperdecoderGlueTask(TranslationTask):
    """Splits absent as such (e.g. `valid`) but present per task (`valid_rte`, `valid_mrpc`, ...) are
    loaded as their concatenation, so the default `--valid-subset valid` scores every task at once."""

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.data_dir = utils.split_paths(cfg.data)[0]
        self.tasks_meta = glue_scoring.load_tasks_json(self.data_dir)
        self.label_words = {t: m.get("labels") for t, m in self.tasks_meta.get("tasks", {}).items()}
        self.bpe = None

    # ---------------------------------------------------------------- data
    def _split_path(self, split, lang):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        return os.path.join(self.data_dir, f"{split}.{src}-{tgt}.{lang}")

    def _per_task_splits(self, split):
        pattern = self._split_path(f"{split}_*", self.cfg.source_lang) + ".idx"
        suffix = len(f".{self.cfg.source_lang}-{self.cfg.target_lang}.{self.cfg.source_lang}.idx")
        return sorted(os.path.basename(p)[:-suffix] for p in glob.glob(pattern))

    def _load_pair(self, split, combine=False):
        return load_langpair_dataset(
            self.data_dir,
            split,
            self.cfg.source_lang,
            self.src_dict,
            self.cfg.target_lang,
            self.tgt_dict,
            combine=combine,
            dataset_impl=self.cfg.dataset_impl,
            upsample_primary=self.cfg.upsample_primary,
            left_pad_source=self.cfg.left_pad_source,
            left_pad_target=self.cfg.left_pad_target,
            max_source_positions=self.cfg.max_source_positions,
            max_target_positions=self.cfg.max_target_positions,
            load_alignments=False,
            truncate_source=self.cfg.truncate_source,
            num_buckets=self.cfg.num_batch_buckets,
            shuffle=not split.startswith("test"),
            pad_to_multiple=self.cfg.required_seq_len_multiple,
        )

    def _labels(self, splits):
        task_ids, golds = [], []
        for s in splits:
            task_file, gold_file = (os.path.join(self.data_dir, f"{s}.{ext}") for ext in ("task", "gold"))
            if not (os.path.exists(task_file) and os.path.exists(gold_file)):
                return None
            names = _read_lines(task_file)
            unknown = sorted(set(names) - set(TASKS))
            require(
                not unknown,
                "--hyperdecoder-eval-glue",
                f"{task_file} names unknown tasks {unknown}; expected text2text names {', '.join(TASKS)}",
            )
            task_ids += [TASKS.index(n) for n in names]
            golds += [float(g) for g in _read_lines(gold_file)]
        return np.asarray(task_ids, dtype=np.int64), np.asarray(golds, dtype=np.float64)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if split == self.cfg.train_subset:
            return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if os.path.exists(self._split_path(split, self.cfg.source_lang) + ".idx"):
            parts = [split]
            dataset = self._load_pair(split)
        else:
            parts = self._per_task_splits(split)
            if not parts:
                raise FileNotFoundError(
                    f"Dataset not found: {split} ({self.data_dir}): neither "
                    f"{split}.* nor per-task {split}_<task>.* files"
                )
            pairs = [self._load_pair(p) for p in parts]
            # one LanguagePairDataset over the concatenated sides keeps ids global (a ConcatDataset of
            # pair datasets would restart ids at 0 for every task)
            src, tgt = ConcatDataset([p.src for p in pairs]), ConcatDataset([p.tgt for p in pairs])
            dataset = LanguagePairDataset(
                src,
                src.sizes,
                self.src_dict,
                tgt,
                tgt.sizes,
                self.tgt_dict,
                left_pad_source=self.cfg.left_pad_source,
                left_pad_target=self.cfg.left_pad_target,
                num_buckets=self.cfg.num_batch_buckets,
                shuffle=not split.startswith("test"),
                pad_to_multiple=self.cfg.required_seq_len_multiple,
            )
            logger.info("%s = concatenation of %s (%d examples)", split, ", ".join(parts), len(dataset))
        labels = self._labels(parts)
        if labels is None:
            require(
                not self.cfg.hyperdecoder_eval_glue,
                "--hyperdecoder-eval-glue",
                f"needs {split}.task and {split}.gold beside the binarized split (glue_preprocess "
                "--format text2text writes them)",
            )
            self.datasets[split] = dataset
        else:
            self.datasets[split] = GlueLabelsDataset(dataset, *labels)

    # ---------------------------------------------------------------- model / decoding
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.hyperdecoder_eval_glue:
            gen_args = _json_flag("--hyperdecoder-eval-args", self.cfg.hyperdecoder_eval_args)
            self.glue_generator = self.build_generator([model], Namespace(**gen_args))
            self.bpe = self._build_bpe()
        return model

    def _build_bpe(self):
        kind = self.cfg.hyperdecoder_eval_bpe
        bpe_args = _json_flag("--hyperdecoder-eval-bpe-args", self.cfg.hyperdecoder_eval_bpe_args)
        if kind == "auto":
            info = self.tasks_meta.get("tokenizer", {})
            kind = info.get("kind", "none")
            for key in ("gpt2_encoder_json", "gpt2_vocab_bpe", "sentencepiece_model"):
                if info.get(key) and key not in bpe_args:
                    bpe_args[key] = info[key]
        require(
            kind in ("none", "gpt2", "sentencepiece", "wordpiece"),
            "--hyperdecoder-eval-bpe",
            f"must be auto, none, gpt2, sentencepiece or wordpiece; got {kind!r}",
        )
        if kind in ("none", "wordpiece"):
            return kind
        if kind == "gpt2":
            for key in ("gpt2_encoder_json", "gpt2_vocab_bpe"):
                require(
                    bpe_args.get(key),
                    "--hyperdecoder-eval-bpe-args",
                    f"gpt2 decoding needs {key} (a local file: nothing is downloaded)",
                )
        return encoders.build_bpe(Namespace(bpe=kind, **bpe_args))

    def decode_tokens(self, tokens) -> str:
        text = self.tgt_dict.string(tokens.int().cpu())
        if self.bpe == "wordpiece":
            return text.replace(" ##", "")
        if self.bpe in (None, "none"):
            return text
        return self.bpe.decode(text)

    def score_batch(self, sample, model, scorer: GlueScorer, records=None):
        """Generate answers for one batch and add them to `scorer` (and (id, task, prediction, gold)
        tuples to `records` when given)."""
        if "glue_task" not in sample:
            raise ValueError(
                "--hyperdecoder-eval-glue: this batch has no task ids; the split needs "
                "<split>.task and <split>.gold files"
            )
        gen_out = self.inference_step(self.glue_generator, [model], sample, prefix_tokens=None)
        for i, hyps in enumerate(gen_out):
            task = TASKS[int(sample["glue_task"][i])]
            prediction = self.decode_tokens(hyps[0]["tokens"])
            scorer.add(task, prediction, float(sample["glue_gold"][i]))
            if records is not None:
                records.append((int(sample["id"][i]), task, prediction, float(sample["glue_gold"][i])))
            if self.cfg.hyperdecoder_print_samples and i == 0:
                logger.info("example %s prediction %r gold %s", task, prediction, float(sample["glue_gold"][i]))
        return scorer

    # ---------------------------------------------------------------- validation metrics
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.hyperdecoder_eval_glue:
            scorer = self.score_batch(sample, model, GlueScorer(self.label_words))
            logging_output.update(scorer.logging_counts())
            # Spearman needs the pairs: exact in one process; lists cannot be summed across workers
            if not (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1
            ):
                for task, (preds, golds) in scorer.pairs.items():
                    logging_output[pairs_key(task)] = (preds, golds)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.cfg.hyperdecoder_eval_glue:
            return
        seen = []
        for task in TASKS:
            keys = count_keys(task)
            totals = {k: sum(float(log.get(k, 0)) for log in logging_outputs) for k in keys}
            for k, v in totals.items():
                metrics.log_scalar_sum(k, v)
            for log in logging_outputs:
                if pairs_key(task) in log and len(log[pairs_key(task)][0]):
                    # a built-in meter: fairseq checkpoints the meters and restores them by class name
                    metrics.log_concat_tensor(
                        pairs_key(task), torch.tensor(list(zip(*log[pairs_key(task)])), dtype=torch.float64)
                    )
            if totals[f"_hd_{task}_n"] > 0:
                seen.append(task)
        if not seen:
            return

        def scores(meters):
            counts = {k: meters[k].sum for t in TASKS for k in count_keys(t) if k in meters}
            pairs = {
                t: (meters[pairs_key(t)].tensor[:, 0].tolist(), meters[pairs_key(t)].tensor[:, 1].tolist())
                for t in TASKS
                if pairs_key(t) in meters and meters[pairs_key(t)].tensor is not None
            }
            return glue_scoring.scores_from_counts(counts, pairs)

        for task in seen:
            for metric in glue_scoring.task_metric_names(task):
                metrics.log_derived(
                    f"{task}_{metric}", lambda meters, t=task, m=metric: scores(meters).get(t, {}).get(m, float("nan"))
                )
        metrics.log_derived("glue_avg", lambda meters: glue_scoring.glue_average(scores(meters)))


def _json_flag(flag: str, value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not valid JSON ({err}): {value!r}; e.g. '{{\"beam\": 1}}'") from None
    require(isinstance(parsed, dict), flag, f"must be a JSON object, got {value!r}")
    return parsed
