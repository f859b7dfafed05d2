"""Checkpoint files on disk: written atomically with a SHA-256 beside them, verified before they are loaded,
and the two ways a load can fail told apart (a damaged file vs. a file refused as unsafe), naming the file.

Every checkpoint `X.pt` the plugin's fairseq writes gets `X.pt.sha256` (the `sha256sum` format, so
`sha256sum -c X.pt.sha256` checks it by hand). A file is written to `X.pt.tmp`, flushed to disk, then
renamed over `X.pt`; copies (checkpoint_last / checkpoint_best) are made the same way, never by truncating
the destination. The checksum file goes through three steps so that a crash between any two renames leaves
a pair that verifies: (1) it lists the new digest and the current one, (2) the data is renamed into place,
(3) it lists the new digest alone. A file without a checksum file (stock fairseq, other tools) is checked
through the CRC-32 of every member of torch's zip archive instead (torch writes them but never reads them).

Used by `fairseq_patches` (atomic writes and copies, verification on load, resume fallback).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

from robustft_common.atomic_files import TMP_SUFFIX, fsync_dir, write_file, write_temp

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
STALE_PATTERNS = ("*.pt" + TMP_SUFFIX, "*.pt" + CHECKSUM_SUFFIX + TMP_SUFFIX)
CHUNK = 1 << 22
LEGACY_TORCH_MAGIC = b"\x80\x02"  # pickle protocol 2: torch.save before the zip format (torch < 1.6)


class CheckpointDamagedError(RuntimeError):
    """The file is not the checkpoint that was written: truncated, bit flips, not a checkpoint at all."""


class CheckpointRefusedError(pickle.UnpicklingError):
    """The file could run code when loaded (a pickled global, a config value fairseq evaluates): refused."""


# -- digests ----------------------------------------------------------------------------------------
def checksum_path(path) -> Path:
    return Path(str(path) + CHECKSUM_SUFFIX)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_digests(path) -> list[str]:
    """The digests `X.pt.sha256` accepts for `X.pt` ([] without a checksum file)."""
    try:
        text = checksum_path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointDamagedError(f"{checksum_path(path)}: unreadable checksum file ({err})") from None
    digests = re.findall(r"^([0-9a-f]{64})\s", text, flags=re.M)
    if not digests:
        raise CheckpointDamagedError(f"{checksum_path(path)}: no SHA-256 digest in the checksum file")
    return digests


def _write_digests(path, digests: list[str]) -> None:
    name = Path(path).name
    text = "".join(f"{d}  {name}\n" for d in digests)
    write_file(checksum_path(path), lambda f: f.write(text.encode("ascii")))


# -- atomic writes ----------------------------------------------------------------------------------
def publish(tmp, final, digest: str) -> None:
    """Rename the complete file `tmp` over `final` with its checksum file (see the module docstring)."""
    tmp, final = Path(tmp), Path(final)
    previous = read_digests(final) if final.exists() else []
    if previous:  # (1): until the rename, the current content must still verify
        _write_digests(final, [digest] + [d for d in previous if d != digest][:1])
    else:
        checksum_path(final).unlink(missing_ok=True)  # no checksum: the zip CRCs check old and new alike
    os.replace(tmp, final)  # (2)
    _write_digests(final, [digest])  # (3)
    fsync_dir(final.parent)


def save_atomically(final, write) -> None:
    """`write(file)` produces the checkpoint; it lands at `final` complete, with its checksum, or not at all."""
    tmp = write_temp(final, write)
    try:
        publish(tmp, final, sha256_of(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomically(src, dst) -> None:
    """Copy `src` to `dst` through a temp file: `dst` is the old file or the complete copy, never a mix.

    The bytes are hashed while copied; a source whose checksum file disagrees is refused (it changed on disk
    since it was written), so a damaged file is never copied into checkpoint_last / checkpoint_best.
    """
    src, dst = Path(src), Path(dst)
    expected = read_digests(src)
    tmp = Path(str(dst) + TMP_SUFFIX)
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(CHUNK):
                digest.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if expected and digest.hexdigest() not in expected:
            raise CheckpointDamagedError(
                f"refusing to copy {src} to {dst}: its SHA-256 {digest.hexdigest()} differs from "
                f"{checksum_path(src)} ({expected[0]}): the file changed on disk after it was written"
            )
        publish(tmp, dst, digest.hexdigest())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- verification -----------------------------------------------------------------------------------
_VERIFIED: set = set()  # (path, inode, size, mtime) already verified by this process: read a file once


def verify(path) -> None:
    """Raise CheckpointDamagedError naming `path` unless it is intact: its SHA-256 matches the checksum file,
    or (without one) every member of torch's zip archive matches its CRC-32."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    expected = read_digests(path)
    if expected:
        actual = sha256_of(path)
        if actual not in expected:
            raise CheckpointDamagedError(
                f"checkpoint {path} is damaged: its SHA-256 is {actual}, {checksum_path(path)} says "
                f"{expected[0]} (the file changed on disk after it was written: truncation or flipped bytes; "
                f"if you rewrote it on purpose, delete {checksum_path(path)})"
            )
    else:
        _verify_zip(path, stat.st_size)
    _VERIFIED.add(key)


def _verify_zip(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(LEGACY_TORCH_MAGIC):
        return  # torch < 1.6 format: no checksums to check; torch.load reports damage itself
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise CheckpointDamagedError(
            f"checkpoint {path} is damaged: not a complete torch archive ({size} bytes, first bytes {head!r}: "
            f"{err}); truncated by a full disk or a killed copy, or not a checkpoint at all"
        ) from None
    if bad is not None:
        raise CheckpointDamagedError(
            f"checkpoint {path} is damaged: member {bad} fails its CRC-32 (flipped bytes on disk or in transfer)"
        )


def load_error(path, err: BaseException) -> BaseException:
    """The error to raise for a torch.load failure of `path`: refused (a pickled global outside the
    allow-list) or damaged (anything else), with torch's own reason, without its advice to disable
    weights_only."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text)
    if isinstance(err, pickle.UnpicklingError) and found:
        return CheckpointRefusedError(refusal_message(path, found.group(1)))
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.S)
    why = reason.group(1).strip() if reason else (text.strip().splitlines() or [type(err).__name__])[0]
    return CheckpointDamagedError(
        f"checkpoint {path} is damaged: torch cannot read it ({type(err).__name__}: {why}); it is truncated, has "
        f"flipped bytes or is not a checkpoint"
    )


def refusal_message(path, what: str) -> str:
    return (
        f"refusing to load checkpoint {path}: it pickles {what}, which is not part of a fairseq "
        f"checkpoint. robustft loads checkpoints with torch weights_only=True and the allow-list in "
        f"robustft_common/compat.py. If this is a genuine checkpoint of another fairseq version, report "
        f"that global so the list can be extended; do not disable weights_only or allow-list it for a "
        f"file you did not produce."
    )


def is_load_failure(err: BaseException) -> bool:
    """Errors torch.load raises on a file it cannot read (as opposed to errors after loading)."""
    if isinstance(err, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)


# -- a save dir -------------------------------------------------------------------------------------
def remove_stale_temps(save_dir) -> list[Path]:
    """Delete the temp files a killed save left in `save_dir` (`*.pt.tmp`, `*.pt.sha256.tmp`)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in sorted(Path(save_dir).glob(pattern)):
            if path.is_file():
                path.unlink()
                removed.append(path)
    if removed:
        logger.warning(
            f"removed {len(removed)} temp file(s) left by an interrupted save: {', '.join(map(str, removed))}"
        )
    return removed


def intact_or_newest_intact(path, suffix: str = "") -> Path:
    """`path` if it verifies, else the newest (by modification time) intact `checkpoint*{suffix}.pt` in its
    directory, with a warning naming both; CheckpointDamagedError when there is none."""
    path = Path(path)
    try:
        verify(path)
        return path
    except CheckpointDamagedError as damaged:
        problem = damaged
    candidates = [
        p for p in path.parent.glob(f"checkpoint*{suffix}.pt") if p.resolve() != path.resolve() and p.is_file()
    ]
    for candidate in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        try:
            verify(candidate)
        except CheckpointDamagedError as err:
            logger.warning(f"not resuming from {candidate} either: {err}")
            continue
        logger.warning(f"{problem}. Resuming from {candidate} instead, the newest intact checkpoint in {path.parent}")
        return candidate
    raise CheckpointDamagedError(f"{problem}; no intact checkpoint in {path.parent} to resume from instead")
