"""rxf_src: fairseq user dir (`--user-dir rxf_src`). Importing it registers its components."""

import robustft_common  # noqa: F401  (fairseq check + the plugin's fairseq patches, R4F's included)
from rxf_src import label_smoothed_cross_entropy_r3f, sentence_prediction_r3f  # noqa: F401
