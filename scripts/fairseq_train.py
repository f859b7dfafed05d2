#!/usr/bin/env python
"""`fairseq-train`, plus what fairseq cannot do itself under torchrun or from another directory.

Same flags, same output as `fairseq-train` (timestamped log lines on stdout, so `> train.log` works).
Single-process runs need none of this: `fairseq-train --user-dir robustft ...` registers every component,
`--arch hf_bert` included. This launcher adds:
- under torchrun, the rank / world-size flags fairseq does not detect (`torchrun_flags`);
- `--user-dir NAME` where NAME is not a folder here (run from outside the checkout): the installed package
  of that name (fairseq resolves the flag against the working directory and its own folder only and
  otherwise fails with a bare FileNotFoundError, fairseq/utils.py:466-481);
- `hf2fairseq` imported, so `--arch hf_bert` also works with a single method's `--user-dir` (e.g. rxf_src).
"""

import importlib.util
import os
import sys
from pathlib import Path

# fairseq_cli.train configures the root logger when it is imported (fairseq_cli/train.py:18-23: format with
# timestamps, stdout). It has to be the first import that reaches fairseq: after any other, the root logger
# has a handler already, fairseq's logging.basicConfig does nothing, and the log goes to stderr bare.
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


def fairseq_finds(user_dir: str) -> bool:
    """Whether fairseq's own lookup resolves `--user-dir user_dir` (fairseq/utils.py:466-481)."""
    fairseq_dir = Path(importlib.util.find_spec("fairseq").origin).parent
    return any(
        Path(p).exists() for p in (os.path.abspath(user_dir), fairseq_dir / user_dir, fairseq_dir.parent / user_dir)
    )


def resolve_user_dir(argv: list) -> list:
    """argv with a `--user-dir` fairseq would not find replaced by the installed package of that name;
    SystemExit naming the flag when there is none."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag != "--user-dir" or (not eq and i + 1 >= len(out)):
            continue
        value = value if eq else out[i + 1]
        if fairseq_finds(value):
            continue
        name = Path(value).name
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                f"--user-dir {value}: no such folder (fairseq resolves it against the working directory "
                f"{os.getcwd()}) and no installed package named {name!r}. Give the plugin folder's path, e.g. "
                '--user-dir "$(python -m robustft user-dir)"'
            )
        found = list(spec.submodule_search_locations)[0]
        if eq:
            out[i] = f"--user-dir={found}"
        else:
            out[i + 1] = found
    return out


if __name__ == "__main__":
    sys.argv = resolve_user_dir(sys.argv) + torchrun_flags(sys.argv, os.environ)
    cli_main()
