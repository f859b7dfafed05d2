"""The multi-task text-to-text base of this plugin's tasks: fairseq `translation` plus

- per-task splits: a split absent as such (`valid`) but present per task (`valid_rte`, `valid_squad`, ...) is
  loaded as their concatenation, so one validation pass scores every task;
- per-example metadata read beside the binarized split (`<split>.task`: the task name per line; subclasses
  add theirs) and added to every batch; the task of each example reaches task-conditioned models as
  `net_input["adapter_task_ids"]`;
- `--split-validation-test`: the reference's seeded halving of a dev set into validation and test halves,
  so early stopping never sees the reported half;
- `--one-task-per-batch`: rabeehk/hyperformer's sampler (one task per batch, temperature sampling);
- decoding generated answers back to text with the data's tokenizer (`--hyperdecoder-eval-bpe`).
"""

import glob
import json
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import BaseWrapperDataset, ConcatDataset, LanguagePairDataset, data_utils, encoders, iterators
from fairseq.tasks.translation import TranslationConfig, TranslationTask, load_langpair_dataset

from robustft_common.utils import unwrap_model
from robustft_common.validation import require

from ..task_batches import schedule_task_batches, split_halves

logger = logging.getLogger(__name__)

TASK_IDS_KEY = "adapter_task_ids"  # the net_input key hyperdecoder_bart's task adapters read


@dataclass
class MultitaskText2TextConfig(TranslationConfig):
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
    split_validation_test: bool = field(
        default=False,
        metadata={
            "help": "halve every dev split valid_X that has no test_X (seeded shuffle): valid_X is the first "
            "half, test_X the second (the reference's split_validation_test)"
        },
    )
    split_validation_test_seed: int = field(
        default=42, metadata={"help": "seed of --split-validation-test's shuffle (reference: 42)"}
    )
    one_task_per_batch: bool = field(
        default=False,
        metadata={"help": "every training batch holds one task (rabeehk/hyperformer's MultiTaskBatchSampler)"},
    )
    task_sampling_temperature: float = field(
        default=1.0,
        metadata={
            "help": "with --one-task-per-batch: a batch's task is drawn with probability ~ size^(1/T); "
            "1 = size-proportional, hyperformer uses 10"
        },
    )


class TaskIdMap:
    """Task name -> the model's task-embedding index, set once the model is built (None: not wanted)."""

    def __init__(self):
        self.index: Optional[Dict[str, int]] = None

    def lookup(self, names) -> torch.Tensor:
        assert self.index is not None
        unknown = sorted({n for n in names if n not in self.index})
        if unknown:
            raise ValueError(
                f"tasks {unknown} are not among the model's task adapters {sorted(self.index)} "
                "(--adapter-tasks, recorded in the checkpoint)"
            )
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)


class IndexSubsetDataset(BaseWrapperDataset):
    """The items `indices` of a token dataset, in that order (for --split-validation-test halves)."""

    def __init__(self, dataset, indices: np.ndarray):
        super().__init__(dataset)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._sizes = np.asarray(dataset.sizes)[self.indices]

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]

    def __len__(self):
        return len(self.indices)

    @property
    def sizes(self):
        return self._sizes

    def size(self, index):
        return self._sizes[index]

    def num_tokens(self, index):
        return self._sizes[index]

    @property
    def supports_prefetch(self):
        return False


class ExampleMetaDataset(BaseWrapperDataset):
    """Adds per-example metadata to each batch: every numeric array of `fields` under its own key, and the
    examples' task indices as net_input["adapter_task_ids"] when the model asks for them."""

    def __init__(self, dataset, fields: Dict[str, np.ndarray], task_names: Optional[np.ndarray], task_ids: TaskIdMap):
        super().__init__(dataset)
        for name, values in fields.items():
            assert len(values) == len(dataset), (name, len(values), len(dataset))
        self.fields, self.task_names, self.task_ids = fields, task_names, task_ids

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if batch:
            ids = batch["id"].numpy()
            for name, values in self.fields.items():
                batch[name] = torch.from_numpy(values[ids])
            if self.task_ids.index is not None:
                if self.task_names is None:
                    raise ValueError(
                        "task adapters need each example's task: this split has no <split>.task file beside it"
                    )
                batch["net_input"][TASK_IDS_KEY] = self.task_ids.lookup(self.task_names[ids])
        return batch


def read_lines(path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def json_flag(flag: str, value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not valid JSON ({err}): {value!r}; e.g. '{{\"beam\": 1}}'") from None
    require(isinstance(parsed, dict), flag, f"must be a JSON object, got {value!r}")
    return parsed


class MultitaskText2TextTask(TranslationTask):
    """Base of hyperdecoder_glue / hyperdecoder_mrqa / hyperdecoder_text2text (see the module docstring).
    Subclasses say whether validation generates (`eval_enabled`) and add metadata (`read_part_metadata`)."""

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.data_dir = utils.split_paths(cfg.data)[0]
        self.tasks_meta = load_tasks_json(self.data_dir)
        self.task_id_map = TaskIdMap()
        self.bpe = None
        self.eval_generator = None
        require(
            cfg.task_sampling_temperature > 0,
            "--task-sampling-temperature",
            f"must be positive, got {cfg.task_sampling_temperature}",
        )

    def eval_enabled(self) -> bool:
        return False

    # ---------------------------------------------------------------- splits
    def split_path(self, split, lang, data_dir=None):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        return os.path.join(data_dir or self.data_dir, f"{split}.{src}-{tgt}.{lang}")

    def split_exists(self, split) -> bool:
        return os.path.exists(self.split_path(split, self.cfg.source_lang) + ".idx")

    def per_task_splits(self, prefix) -> List[str]:
        pattern = self.split_path(f"{prefix}_*", self.cfg.source_lang) + ".idx"
        suffix = len(f".{self.cfg.source_lang}-{self.cfg.target_lang}.{self.cfg.source_lang}.idx")
        return sorted(os.path.basename(p)[:-suffix] for p in glob.glob(pattern))

    def _halved(self, split) -> Optional[tuple]:
        """(dev split on disk, half) when --split-validation-test makes `split` a half of a dev split:
        valid[_X] without a test[_X] on disk -> its first half; test[_X] absent -> the second half of valid[_X]."""
        if not self.cfg.split_validation_test:
            return None
        head, sep, name = split.partition("_")
        valid, test = f"valid{sep}{name}", f"test{sep}{name}"
        if head == "valid" and self.split_exists(split) and not self.split_exists(test):
            return split, 0
        if head == "test" and not self.split_exists(split) and self.split_exists(valid):
            return valid, 1
        return None

    def resolve_parts(self, split) -> List[tuple]:
        """(split on disk, half or None) for every part of `split`."""
        halved = self._halved(split)
        if halved is not None:
            return [halved]
        if self.split_exists(split):
            return [(split, None)]
        names = set(self.per_task_splits(split))
        if self.cfg.split_validation_test and split in ("valid", "test"):
            names |= {f"{split}_{n.split('_', 1)[1]}" for n in self.per_task_splits("valid")}
        parts = [self._halved(n) or (n, None) for n in sorted(names)]
        parts = [p for p in parts if self.split_exists(p[0])]
        if not parts:
            raise FileNotFoundError(
                f"Dataset not found: {split} ({self.data_dir}): neither {split}.* nor per-task {split}_<task>.* files"
            )
        return parts

    # ---------------------------------------------------------------- metadata
    def read_part_metadata(
        self, part: str, size: int, data_dir: Optional[str] = None, train: bool = False
    ) -> Dict[str, np.ndarray]:
        """Per-example arrays of one split on disk (`task`: names from <part>.task). Subclasses add theirs
        (only `task` is needed when the split is loaded for training); a key missing from some part of a
        concatenation is dropped."""
        path = os.path.join(data_dir or self.data_dir, f"{part}.task")
        if not os.path.exists(path):
            return {}
        names = read_lines(path)
        require(
            len(names) == size,
            "--task",
            f"{path} has {len(names)} lines but {part} holds {size} examples; rebuild the data",
        )
        return {"task": np.asarray(names, dtype=object)}

    def group_keys(self, meta: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        """Examples with equal keys stay in the same half (MRQA: the windows of one question)."""
        return None

    def adapter_task_names(self) -> List[str]:
        """The data's task names, sorted (task adapters' embedding order for a new model)."""
        listed = self.tasks_meta.get("tasks")
        if listed:
            return sorted(listed)
        path = os.path.join(self.data_dir, f"{self.cfg.train_subset}.task")
        return sorted(set(read_lines(path))) if os.path.exists(path) else []

    # ---------------------------------------------------------------- loading
    def _load_pair(self, split):
        return load_langpair_dataset(
            self.data_dir,
            split,
            self.cfg.source_lang,
            self.src_dict,
            self.cfg.target_lang,
            self.tgt_dict,
            combine=False,
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

    def _load_part(self, part, half):
        pair = self._load_pair(part)
        src, tgt = pair.src, pair.tgt
        meta = self.read_part_metadata(part, len(src))
        if half is not None:
            keep = split_halves(len(src), self.cfg.split_validation_test_seed, self.group_keys(meta))[half]
            src, tgt = IndexSubsetDataset(src, keep), IndexSubsetDataset(tgt, keep)
            meta = {k: v[keep] for k, v in meta.items()}
        return src, tgt, meta

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if split == self.cfg.train_subset:
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
            paths = utils.split_paths(self.cfg.data)  # translation.py L329-334: epoch-sharded train data
            dataset = self.datasets[split]
            meta = self.read_part_metadata(split, len(dataset), paths[(epoch - 1) % len(paths)], train=True)
            self.datasets[split] = self.wrap_with_metadata(split, dataset, meta)
            return
        parts = self.resolve_parts(split)
        loaded = [self._load_part(part, half) for part, half in parts]
        # one LanguagePairDataset over the concatenated sides keeps ids global (a ConcatDataset of pair
        # datasets would restart ids at 0 for every part)
        src = loaded[0][0] if len(loaded) == 1 else ConcatDataset([p[0] for p in loaded])
        tgt = loaded[0][1] if len(loaded) == 1 else ConcatDataset([p[1] for p in loaded])
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
        keys = set.intersection(*(set(p[2]) for p in loaded))
        meta = {k: np.concatenate([p[2][k] for p in loaded]) for k in keys}
        if len(parts) > 1 or parts[0][1] is not None:
            described = ", ".join(part if half is None else f"{part}[half {half + 1}/2]" for part, half in parts)
            logger.info("%s = %s (%d examples)", split, described, len(dataset))
        self.datasets[split] = self.wrap_with_metadata(split, dataset, meta)

    def wrap_with_metadata(self, split, dataset, meta: Dict[str, np.ndarray]):
        names = meta.pop("task", None)
        return ExampleMetaDataset(dataset, meta, names, self.task_id_map)

    # ---------------------------------------------------------------- batching
    def get_batch_iterator(self, dataset, **kwargs):
        train = self.datasets.get(self.cfg.train_subset)
        if not (self.cfg.one_task_per_batch and train is not None and dataset is train):
            return super().get_batch_iterator(dataset, **kwargs)
        require(
            getattr(dataset, "task_names", None) is not None,
            "--one-task-per-batch",
            f"needs {self.cfg.train_subset}.task (one task name per example) beside the binarized data",
        )
        return self._one_task_per_batch_iterator(dataset, **kwargs)

    def _one_task_per_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        skip_remainder_batch=False,
        **unused,
    ):
        names = dataset.task_names
        tasks = sorted(set(names))

        def make_batches(dataset, epoch):
            with data_utils.numpy_seed(seed + epoch):
                indices = dataset.ordered_indices()
            if max_positions is not None:
                indices = self.filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
            per_task = {
                t: dataset.batch_by_size(
                    indices[names[indices] == t],
                    max_tokens=max_tokens,
                    max_sentences=max_sentences,
                    required_batch_size_multiple=required_batch_size_multiple,
                )
                for t in tasks
            }
            sizes = {t: int((names == t).sum()) for t in tasks}
            rng = np.random.RandomState(seed + epoch)
            return schedule_task_batches(per_task, sizes, self.cfg.task_sampling_temperature, num_shards, rng)

        dataset.set_epoch(epoch)
        # grouped shuffling keeps each block of num_shards batches (one task) together, so all workers of a
        # step see the same task, as hyperformer's sampler does
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=make_batches,
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            skip_remainder_batch=skip_remainder_batch,
            grouped_shuffling=True,
        )

    # ---------------------------------------------------------------- model / decoding
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        names = getattr(model, "adapter_task_names", None)
        if names:
            self.task_id_map.index = {n: i for i, n in enumerate(names)}
        if self.eval_enabled():
            self.setup_eval(model)
        return model

    def setup_eval(self, model):
        """The validation generator (--hyperdecoder-eval-args) and the answers' detokenizer."""
        gen_args = json_flag("--hyperdecoder-eval-args", self.cfg.hyperdecoder_eval_args)
        self.eval_generator = self.build_generator([model], Namespace(**gen_args))
        self.bpe = self._build_bpe()

    def _build_bpe(self):
        kind = self.cfg.hyperdecoder_eval_bpe
        bpe_args = json_flag("--hyperdecoder-eval-bpe-args", self.cfg.hyperdecoder_eval_bpe_args)
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

    def generate(self, sample, model, generator=None):
        """Best hypothesis per example: (decoded text, hypothesis dict with tokens/positional_scores)."""
        generator = generator or self.eval_generator
        set_beam(model, generator.beam_size)
        hypos = self.inference_step(generator, [model], sample, prefix_tokens=None)
        return [(self.decode_tokens(h[0]["tokens"]), h[0]) for h in hypos]


def set_beam(model, beam: int) -> None:
    """Set BART's beam state for a generator's beam size. BART keeps it in the model (bart/model.py L282-291:
    the cross-attention's beam size, and `reorder_encoder_out` swapped for a no-op on the instance), set once
    per generator in SequenceGenerator.__init__ (sequence_generator.py L97, only for beam > 1): with one
    generator per task, the last one built would decide for all, and a beam-1 search after a beam-k one
    would keep the no-op reorder while finished sentences leave the batch."""
    model = unwrap_model(model)
    if not hasattr(model, "set_beam_size"):
        return
    model.set_beam_size(beam)
    if beam == 1:
        model.encoder.__dict__.pop("reorder_encoder_out", None)  # back to the class's real reorder


def select_rows(sample: dict, rows: torch.Tensor, batch_size: int) -> dict:
    """The batch restricted to `rows`: every tensor whose first dimension is the batch is indexed (nested dicts
    too, e.g. net_input); other entries are kept as they are."""
    out: dict = {}
    for key, value in sample.items():
        if isinstance(value, dict):
            out[key] = select_rows(value, rows, batch_size)
        elif torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch_size:
            out[key] = value.index_select(0, rows.to(value.device))
        else:
            out[key] = value
    return out


def load_tasks_json(data_dir: str) -> dict:
    path = os.path.join(data_dir, "tasks.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
