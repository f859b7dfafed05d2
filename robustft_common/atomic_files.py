"""Outputs that appear whole or not at all: a file or a folder is built under a temp name beside its final
place and renamed into place once complete (rename is atomic within a file system).

Used by checkpoint writing (`checkpoint_files`), glue_preprocess / seq2seq_preprocess output folders,
hf2fairseq conversions, and the sweep / quality-study run records and reports (`robustft_experiments`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"  # a file's temp name: fairseq's own (checkpoint_utils.py:585) and ours


def fsync_dir(path) -> None:
    """Make renames inside directory `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(final, write) -> Path:
    """Write `final.tmp` through `write(file)` and flush it to disk; returns its path (removed on error)."""
    tmp = Path(str(final) + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_file(final, write) -> None:
    """Write `final` through `write(file)` into `final.tmp`, flush it to disk, rename it over `final`; on any
    error `final` is untouched and the temp file removed."""
    tmp = write_temp(final, write)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(final, text: str) -> None:
    """`write_file` for a text file (UTF-8): a report, a run's status.json."""
    write_file(final, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def atomic_dir(final: Path, overwrite: bool):
    """Yield a temp dir beside `final`; rename it to `final` only if the block completes.

    An existing `final` (with `overwrite`) is moved aside first and deleted after: a crash between those two
    renames leaves `final` missing and the previous folder in `.NAME.old-*/d` beside it."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output should look like a normal folder
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "d")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
