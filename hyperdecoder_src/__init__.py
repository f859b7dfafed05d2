"""hyperdecoder_src: fairseq user dir (`--user-dir hyperdecoder_src`). Importing it registers its components:
model `hyperdecoder_bart` (+ archs) and task `hyperdecoder_glue`."""

import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)

from . import models, tasks  # noqa: F401
