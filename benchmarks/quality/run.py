#!/usr/bin/env python
"""Entry point of the quality study (protocol, stages and options: robustft_experiments/quality.py).

python benchmarks/quality/run.py --work-dir /scratch/quality --tasks CoLA,RTE --jobs 2
"""

import sys

from robustft_experiments.quality import main

if __name__ == "__main__":
    sys.exit(main())
