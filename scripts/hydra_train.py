#!/usr/bin/env python
"""`fairseq-hydra-train` with the plugin imported first (fairseq.md trap 1.3: hydra resolves the config,
including `criterion: {_name: sentence_prediction_r3f}` and `model._name=hf_bert`, before fairseq would
import --user-dir).

    python scripts/hydra_train.py --config-dir scripts/configs/finetuning --config-name rte \
        task.data=RTE-bin checkpoint.restore_file=/path/to/model.pt hydra.run.dir=.

ROBUSTFT_USER_DIR (used by the yamls' common.user_dir) defaults to this checkout's robustft/.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROBUSTFT_USER_DIR", str(REPO / "robustft"))

from fairseq_cli.hydra_train import cli_main  # noqa: E402

import hf2fairseq  # noqa: E402,F401  (model hf_bert)
import robustft  # noqa: E402,F401  (criterions, optimizers, models, tasks into hydra's ConfigStore)

if __name__ == "__main__":
    cli_main()
