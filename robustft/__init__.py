"""The umbrella fairseq user dir: `--user-dir robustft` registers the components of all four methods,
so one run can combine them (e.g. HyPe perturbation + the R3F criterion + the adamax_pats optimizer)."""

import baselines_src  # noqa: F401  (R-Drop, NEFTune criterions)
import hf2fairseq  # noqa: F401  (arch hf_bert: converted BERT-family checkpoints)
import hype_src  # noqa: F401
import hyperdecoder_src  # noqa: F401
import pats_src  # noqa: F401
import robustft_common  # noqa: F401
import rxf_src  # noqa: F401
