"""Models of the hyperdecoder user dir (fairseq also auto-imports this folder)."""

from . import baselines, hyperdecoder_bart  # noqa: F401
