"""rxf_src: fairseq user dir (`--user-dir rxf_src`). Importing it registers its components."""
import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from rxf_src import r4f  # noqa: F401  (R4F checkpoint loading; --r4f-spectral-norm-dense)
from rxf_src import label_smoothed_cross_entropy_r3f, sentence_prediction_r3f  # noqa: F401
