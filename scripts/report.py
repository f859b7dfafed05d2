#!/usr/bin/env python
"""Report of a sweep: best dev metric per run -> results.{csv,json,md,png} (mean ± std over seeds).

    python scripts/report.py SWEEP_DIR [--title TITLE]

Entry point of `robustft_experiments.report` (same as `python -m robustft_experiments.report`).
"""

import sys

from robustft_experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
