"""`python -m robustft flags [NAME ...]`: every plugin component's flags with default and help.
`python -m robustft user-dir`: the absolute path to pass as `--user-dir` from any directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    flags = sub.add_parser("flags", help="list every registered component with its flags, defaults and help")
    flags.add_argument("names", nargs="*", help="only these components (criterion, optimizer, model, arch, ... names)")
    sub.add_parser("user-dir", help="print the folder to pass as fairseq's --user-dir")
    args = p.parse_args(argv)
    if args.command == "user-dir":
        print(Path(__file__).resolve().parent)
        return 0
    from robustft.flags import listing

    sys.stdout.write(listing(args.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
