"""The GLUE task table: one entry per task, read by every part of the project that needs task facts.

Readers: `glue_preprocess` (file layouts, label order, text-to-text names and words), the sentence-
prediction sweep (`--num-classes`, `--regression-target`, the fairseq `--report-*` flags and the best-
checkpoint metric), the report (metric per column, task order, aliases), and the text-to-text scoring of
`hyperdecoder_src` (official metrics, positive class, regression).

Pure Python: no fairseq or torch import here, so any tool can read the table cheaply.

Facts and their sources:
- file layouts, headers and label strings: the standard `download_glue_data.py` release (the tsv files
  under `../shared/data/glue`, see its README);
- `metrics`: GLUE's official metric(s) per task, in the order papers report them (Wang et al., ICLR 2019,
  Table 1); `best_metric`: the one fairseq selects the best checkpoint on (the RoBERTa GLUE recipe,
  `fairseq/examples/roberta/config/finetuning/*.yaml`: CoLA mcc, MRPC f1 (acc_and_f1), STS-B pearson,
  accuracy otherwise);
- `report_flags`: the `--report-*` flags of fairseq's `sentence_prediction` task that log those metrics;
- `dev_majority`: the score of always predicting the dev set's most frequent class (accuracy, and F1 /
  MCC where that is the metric), counted on the GLUE dev files here; None where the files are absent.
  A run at this level has learned nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FileLayout:
    """Columns of one GLUE file: `header` None = no header row; negative indices count from the end."""

    n_columns: int
    text_columns: tuple
    label_column: int | None = None
    header: tuple | None = None


@dataclass(frozen=True)
class GlueTask:
    name: str  # GLUE folder name, the canonical spelling ("SST-2")
    t2t_name: str  # lowercase HF-style name of the text2text format ("sst2")
    fields: tuple  # text2text field names, one per text column
    labels: tuple | None  # label strings in class-id order (= the fairseq label dictionary); None = regression
    label_words: tuple | None  # text2text target word per class id
    metrics: tuple  # GLUE's official metric(s), report order
    best_metric: str  # fairseq --best-checkpoint-metric (maximized)
    report_flags: tuple  # fairseq sentence_prediction --report-* flags
    # split name -> ((file name, layout), ...) in fairseq order (valid, valid1, ...)
    files: dict[str, tuple] = field(default_factory=dict)
    positive_class: int | None = None  # class id F1 / MCC count as positive
    aliases: tuple = ()  # extra spellings accepted by resolve_task
    dev_majority: dict[str, float] | None = None  # majority-class dev scores, x100

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_classes(self) -> int:
        """fairseq --num-classes: 1 for regression (STS-B)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def n_inputs(self) -> int:
        return len(self.fields)

    def train_flags(self) -> list:
        """fairseq-train flags for this task: classes, regression, metrics, best-checkpoint selection."""
        flags = ["--num-classes", str(self.num_classes)]
        if self.regression:
            flags.append("--regression-target")
        flags += list(self.report_flags)
        flags += ["--best-checkpoint-metric", self.best_metric, "--maximize-best-checkpoint-metric"]
        return flags


_MNLI_TRAIN_HEADER = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
)
_MNLI_DEV_HEADER = _MNLI_TRAIN_HEADER[:-1] + ("label2", "label3", "label4", "label5", "gold_label")
_STSB_HEADER = (
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
)
_MRPC_HEADER = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
_PAIR_HEADER = ("index", "sentence1", "sentence2")


def _files(train: FileLayout, test: FileLayout) -> dict[str, tuple]:
    """train.tsv / dev.tsv (same layout) / test.tsv: every task but MNLI."""
    return {"train": (("train.tsv", train),), "valid": (("dev.tsv", train),), "test": (("test.tsv", test),)}


_MNLI_TRAIN = FileLayout(12, (8, 9), -1, _MNLI_TRAIN_HEADER)
_MNLI_DEV = FileLayout(16, (8, 9), -1, _MNLI_DEV_HEADER)
_MNLI_TEST = FileLayout(10, (8, 9), None, _MNLI_TRAIN_HEADER[:10])
_AX = FileLayout(3, (1, 2), None, _PAIR_HEADER)

ACC_AND_F1 = ("--report-acc-and-f1",)

# GLUE's own task order (Wang et al., 2019, Table 1); the report uses REPORT_ORDER below.
_TASK_LIST = (
    GlueTask(
        "CoLA",
        "cola",
        ("sentence",),
        ("0", "1"),
        ("unacceptable", "acceptable"),
        ("mcc",),
        "mcc",
        ("--report-mcc",),
        _files(FileLayout(4, (3,), 1, None), FileLayout(2, (1,), None, ("index", "sentence"))),
        positive_class=1,
        dev_majority={"accuracy": 100 * 721 / 1043, "mcc": 0.0},
    ),  # acceptable 721 of 1043
    GlueTask(
        "SST-2",
        "sst2",
        ("sentence",),
        ("0", "1"),
        ("negative", "positive"),
        ("accuracy",),
        "accuracy",
        (),
        _files(FileLayout(2, (0,), 1, ("sentence", "label")), FileLayout(2, (1,), None, ("index", "sentence"))),
        dev_majority={"accuracy": 100 * 444 / 872},
    ),  # positive 444 of 872
    GlueTask(
        "MRPC",
        "mrpc",
        ("sentence1", "sentence2"),
        ("0", "1"),
        ("not_equivalent", "equivalent"),
        ("f1", "accuracy"),
        "f1",
        ACC_AND_F1,
        _files(FileLayout(5, (3, 4), 0, _MRPC_HEADER), FileLayout(5, (3, 4), None, ("index",) + _MRPC_HEADER[1:])),
        positive_class=1,
        # equivalent 279 of 408: accuracy 279/408, F1 = 2*279 / (2*279 + 129)
        dev_majority={"accuracy": 100 * 279 / 408, "f1": 100 * 558 / 687},
    ),
    GlueTask(
        "STS-B",
        "stsb",
        ("sentence1", "sentence2"),
        None,
        None,
        ("pearson", "spearman"),
        "pearson",
        ("--report-pearson-and-spearman",),
        _files(FileLayout(10, (7, 8), 9, _STSB_HEADER), FileLayout(9, (7, 8), None, _STSB_HEADER[:-1])),
        dev_majority={"pearson": 0.0, "spearman": 0.0},
    ),  # a constant prediction: correlation 0 (undefined)
    GlueTask(
        "QQP",
        "qqp",
        ("question1", "question2"),
        ("0", "1"),
        ("not_duplicate", "duplicate"),
        ("f1", "accuracy"),
        "accuracy",
        ACC_AND_F1,
        _files(
            FileLayout(6, (3, 4), 5, ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")),
            FileLayout(3, (1, 2), None, ("id", "question1", "question2")),
        ),
        positive_class=1,
    ),
    GlueTask(
        "MNLI",
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy",
        (),
        {
            "train": (("train.tsv", _MNLI_TRAIN),),
            "valid": (("dev_matched.tsv", _MNLI_DEV), ("dev_mismatched.tsv", _MNLI_DEV)),
            "test": (
                ("test_matched.tsv", _MNLI_TEST),
                ("test_mismatched.tsv", _MNLI_TEST),
                ("../diagnostic/diagnostic.tsv", _AX),
            ),
        },
        aliases=("mnli-m",),
    ),
    GlueTask(
        "QNLI",
        "qnli",
        ("question", "sentence"),
        ("entailment", "not_entailment"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
        (),
        _files(
            FileLayout(4, (1, 2), 3, ("index", "question", "sentence", "label")),
            FileLayout(3, (1, 2), None, ("index", "question", "sentence")),
        ),
        dev_majority={"accuracy": 100 * 2761 / 5463},
    ),  # not_entailment 2761 of 5463
    GlueTask(
        "RTE",
        "rte",
        ("sentence1", "sentence2"),
        ("entailment", "not_entailment"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
        (),
        _files(
            FileLayout(4, (1, 2), 3, ("index", "sentence1", "sentence2", "label")),
            FileLayout(3, (1, 2), None, _PAIR_HEADER),
        ),
        dev_majority={"accuracy": 100 * 146 / 277},
    ),  # entailment 146 of 277
    GlueTask(
        "WNLI",
        "wnli",
        ("sentence1", "sentence2"),
        ("0", "1"),
        ("not_entailment", "entailment"),
        ("accuracy",),
        "accuracy",
        (),
        _files(
            FileLayout(4, (1, 2), 3, ("index", "sentence1", "sentence2", "label")),
            FileLayout(3, (1, 2), None, _PAIR_HEADER),
        ),
    ),
)

TASKS: dict[str, GlueTask] = {t.name: t for t in _TASK_LIST}
TASK_ORDER: tuple[str, ...] = tuple(TASKS)
# column order of the papers' GLUE tables (RoBERTa, R3F: MNLI QQP QNLI SST-2 CoLA STS-B MRPC RTE), WNLI last
REPORT_ORDER: tuple[str, ...] = ("MNLI", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE", "WNLI")
# text-to-text name -> task ("sst2" -> SST-2)
BY_T2T: dict[str, GlueTask] = {t.t2t_name: t for t in _TASK_LIST}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_ALIASES: dict[str, str] = {}
for _task in _TASK_LIST:
    for _spelling in (_task.name, _task.t2t_name, *_task.aliases):
        _ALIASES[_key(_spelling)] = _task.name


def resolve_task(name: str, flag: str = "--tasks") -> GlueTask:
    """The task for any usual spelling ("sts-b", "STSB", "sst_2", "mnli-m"); ValueError naming `flag`."""
    task = _ALIASES.get(_key(name))
    if task is None:
        raise ValueError(f"{flag}: unknown GLUE task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[task]


def canonical_name(name: str, flag: str = "--tasks") -> str:
    """The GLUE folder spelling of a task name ("sts-b" -> "STS-B")."""
    return resolve_task(name, flag).name


def main(argv=None) -> int:
    """`python -m robustft_common.glue_tasks list | flags TASK` (flags: shell-quoted, for recipes)."""
    import shlex
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"] and len(argv) == 1:
        print("\n".join(TASKS))
        return 0
    if argv[:1] == ["flags"] and len(argv) == 2:
        try:
            print(shlex.join(resolve_task(argv[1], "TASK").train_flags()))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m robustft_common.glue_tasks {list|flags TASK}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
