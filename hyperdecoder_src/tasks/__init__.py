"""Tasks of the hyperdecoder user dir (fairseq also auto-imports this folder)."""

from . import hyperdecoder_glue, hyperdecoder_mrqa, hyperdecoder_text2text  # noqa: F401
