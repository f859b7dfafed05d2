#!/usr/bin/env python
"""HF BERT-family checkpoint -> fairseq checkpoint; same as `python -m hf2fairseq` (see hf2fairseq/convert.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .`
from hf2fairseq.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
