#!/usr/bin/env python
"""Build the GPU carry bundle (`make gpu-bundle`): cp312 wheels of what the lent GPU machine lacks, fairseq,
this plugin, the restricted MiniLM + RTE of the fine-tune check, and a manifest (README "GPU check").

    python scripts/gpu_bundle.py [--out gpu_bundle] [--glue-dir DIR]

Entry point of `robustft_experiments.gpu_bundle` (options: `--help`).
"""

import sys

from robustft_experiments.gpu_bundle import main

if __name__ == "__main__":
    sys.exit(main())
