"""transformers is an optional extra of this package (`pip install -e .[hf]`), never needed by the plugin.

Only the RoBERTa / XLM-R import (their tokenizers come in transformers' formats) and the export need it;
they call `require_transformers` first, so a missing or too old install stops with the command to run.
"""

from __future__ import annotations

import importlib

EXTRA = "hf"
INSTALL_HINT = "pip install -e '.[hf]' in the robustft checkout (or pip install 'transformers>=5')"
MIN_MAJOR = 5  # the TokenizersBackend tokenizers (BertTokenizer(vocab=...), ...) are transformers 5's


def require_transformers(what: str):
    """The transformers module, or SystemExit naming the `hf` extra."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        raise SystemExit(
            f"{what} needs Hugging Face transformers, the optional extra `{EXTRA}` of robustft, "
            f"which is not installed ({err}): {INSTALL_HINT}"
        ) from err
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_MAJOR:
        raise SystemExit(
            f"{what} needs transformers >= {MIN_MAJOR} (the `{EXTRA}` extra), found {transformers.__version__}: "
            f"{INSTALL_HINT}"
        )
    return transformers
