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
