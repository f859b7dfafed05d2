"""baselines_src: fairseq user dir (`--user-dir baselines_src`). Importing it registers the criterions of the
baselines the seed papers compare against: `sentence_prediction_rdrop`, `label_smoothed_cross_entropy_rdrop`
(R-Drop) and `sentence_prediction_neftune` (NEFTune). Mixout is model-side and lives in
`robustft_common/mixout.py` (its `--mixout-*` flags are on every sentence-prediction criterion of the plugin)."""

import robustft_common  # noqa: F401  (fairseq check + the plugin's fairseq patches, Mixout's included)
from baselines_src import neftune, rdrop  # noqa: F401  (registers the criterions)
