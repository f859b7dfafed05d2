#!/usr/bin/env python
"""Sweep GLUE tasks x methods x seeds with fairseq-train, restartably, then write the report.

    python scripts/sweep.py --data-root DATA --pretrained CONVERTED --tasks RTE,MRPC \
        --methods vanilla,r3f,hype_u,pats,hype_r3f --seeds 1,2,3 --output-dir sweeps/minilm

Entry point of `robustft_experiments.sweep` (options: `--help`; same as `python -m robustft_experiments.sweep`).
"""

import sys

from robustft_experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
