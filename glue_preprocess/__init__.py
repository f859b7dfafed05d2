"""GLUE tsv -> binarized fairseq data (`python -m glue_preprocess`); see glue_preprocess/README.md."""

from .core import FORMATS, load_task_splits, preprocess
from .tasks import TASKS, GlueFormatError, parse_file, read_split, resolve_task

__all__ = [
    "preprocess",
    "load_task_splits",
    "read_split",
    "parse_file",
    "resolve_task",
    "TASKS",
    "FORMATS",
    "GlueFormatError",
]
