"""Fixtures shared by the test files (plain helpers, e.g. `sentence_prediction_args`, `run_tool`, live in
tests/fairseq_helpers.py and are imported).

`sp_data` is the tiny toy classification task every end-to-end sentence-prediction test trains on
(`make_sentence_prediction_data` with its defaults), binarized once per session (per xdist worker) instead
of once per file. Tests only read it; a test that needs other data builds its own.
"""

import pytest

from tests.fairseq_helpers import make_sentence_prediction_data


def shared_sentence_prediction_data(tmp_path_factory) -> object:
    """The session's toy classification data (binarized RoBERTa GLUE layout), built on first use."""
    root = tmp_path_factory.getbasetemp() / "shared_sp_data"
    if not (root / "bin" / "label" / "valid.bin").exists():
        make_sentence_prediction_data(root)
    return root / "bin"


@pytest.fixture(scope="session")
def sp_data(tmp_path_factory):
    return shared_sentence_prediction_data(tmp_path_factory)


@pytest.fixture(scope="session")
def genuine_checkpoint(sp_data, tmp_path_factory):
    """checkpoint_last.pt (+ its .sha256) of the tiny model on `sp_data` before its first update, written once
    per session by fairseq's own save_checkpoint in-process (tests/fairseq_helpers.py: write_checkpoint). Read
    only: copy it before changing it."""
    import robustft  # noqa: F401  (the plugin's checkpoint writing, as --user-dir installs it)
    from tests.fairseq_helpers import write_checkpoint

    return write_checkpoint(sp_data, tmp_path_factory.mktemp("genuine_checkpoint"))
