"""What the preprocessing command lines (`python -m glue_preprocess`, `python -m seq2seq_preprocess`) do with
an error: one line naming the problem (and, for a malformed row, the flag that skips such rows), exit 2."""

import sys
from collections.abc import Callable


def run_preprocess(prog: str, preprocess: Callable[..., object], kwargs: dict, row_error: type[Exception]) -> int:
    """Call `preprocess(**kwargs)`; 0 on success, 2 after printing `prog: error: ...` on a known failure."""
    try:
        preprocess(**kwargs)
    except row_error as e:
        print(
            f"{prog}: error: {e}\n(fix the row, or pass --skip-bad-rows to skip and count such rows)", file=sys.stderr
        )
        return 2
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
