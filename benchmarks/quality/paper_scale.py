#!/usr/bin/env python
"""Paper-scale reproduction of R3F, HyPe and PATS, one command per paper (what it runs and reports:
robustft_experiments/paper_scale.py; the commands: docs/recipes.md, benchmarks/quality/README.md).

    python benchmarks/quality/paper_scale.py --paper r3f --backbone roberta-large \
        --data-root glue-bin --pretrained roberta.large/model.pt --output-dir repro/r3f
"""

import sys

from robustft_experiments.paper_scale import main

if __name__ == "__main__":
    sys.exit(main())
