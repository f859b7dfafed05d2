#!/usr/bin/env python
"""`fairseq-train` with the `hf_bert` model registered (converted BERT-family checkpoints, exact LayerNorm eps).

Same flags as fairseq-train; add `--user-dir robustft` for the methods as usual. Registering the model
before fairseq parses `--arch` is why this launcher exists (fairseq accepts a single --user-dir).
"""

import sys

from fairseq_cli.train import cli_main

import hf2fairseq  # noqa: F401  (registers --arch hf_bert; also in spawned workers: module level)


def torchrun_flags(argv, env) -> list:
    """Under torchrun, fairseq's auto-detection fails (fairseq.md §5): pass rank/world size explicitly."""
    if "LOCAL_RANK" not in env or "--distributed-rank" in argv:
        return []
    return [
        "--distributed-world-size",
        env["WORLD_SIZE"],
        "--distributed-rank",
        env["RANK"],
        "--device-id",
        env["LOCAL_RANK"],
        "--distributed-init-method",
        "env://",
        "--distributed-no-spawn",
    ]


if __name__ == "__main__":
    import os

    sys.argv += torchrun_flags(sys.argv, os.environ)
    cli_main()
