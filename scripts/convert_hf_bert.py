#!/usr/bin/env python
"""HF BERT-family checkpoint -> fairseq checkpoint; same as `python -m hf2fairseq` (see hf2fairseq/convert.py)."""

import sys

from hf2fairseq.convert import main

if __name__ == "__main__":
    sys.exit(main())
