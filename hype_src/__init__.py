"""hype_src: fairseq user dir (`--user-dir hype_src`). Importing it registers its components."""

import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from hype_src import criterion  # noqa: F401  (registers hype_sentence_prediction)
