"""pats_src: fairseq user dir (`--user-dir pats_src`). Importing it registers its components:
optimizers `adamax_pats` (PATS) and `adamax_sage` (SAGE), both with NoisyTune (`--noisytune-lambda`)."""

import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from pats_src import optim  # noqa: F401  (registers adamax_pats, adamax_sage)
