"""baselines_src: fairseq user dir (`--user-dir baselines_src`). Importing it registers the components of the
baselines the seed papers compare against: `sentence_prediction_rdrop`, `label_smoothed_cross_entropy_rdrop`
(R-Drop), `sentence_prediction_neftune` (NEFTune), `adam_childtuning` / `adamax_childtuning` /
`adamax_sage_childtuning` (ChildTuning-F/-D), `sentence_prediction_smart` (SMART) and the task
`sentence_prediction_freelb` (FreeLB). Mixout is model-side and lives in
`robustft_common/mixout.py` (its `--mixout-*` flags are on every sentence-prediction criterion of the plugin)."""

import robustft_common  # noqa: F401  (fairseq check + the plugin's fairseq patches, Mixout's included)

# registers the criterions (R-Drop, NEFTune, SMART), the *_childtuning optimizers and FreeLB's task
from baselines_src import childtuning, freelb, neftune, rdrop, smart  # noqa: F401
