"""Checkpoint files (robustft_common/checkpoint_files.py through fairseq_patches): atomic writes and copies
with a checksum file, verification on load that tells a damaged file from a refused one and names it, the
temp files of a killed save removed, and resume falling back from a damaged checkpoint_last.pt to the newest
intact checkpoint (end to end, with a real SIGTERM at the end: tests/test_preemption.py has the rest)."""

import os
import pickle
import resource
import shutil
import signal
import subprocess
import zipfile

import pytest
import torch

import robustft  # noqa: F401  (installs the patches, as --user-dir does)
from robustft_common import checkpoint_files
from robustft_common.checkpoint_files import CheckpointDamagedError, CheckpointRefusedError
from robustft_common.preemption import PREEMPTED_EXIT_CODE
from tests.fairseq_helpers import BIN, REPO, json_logs, sentence_prediction_args


@pytest.fixture(scope="module")
def genuine(genuine_checkpoint):
    """checkpoint_last.pt (+ .sha256) of the tiny model, written by fairseq's save_checkpoint (conftest)."""
    return genuine_checkpoint


@pytest.fixture
def copy_of(genuine, tmp_path):
    """A fresh copy of the genuine checkpoint (and its checksum file) to damage."""

    def make(name="checkpoint_last.pt", checksum=True):
        path = tmp_path / name
        shutil.copyfile(genuine, path)
        checkpoint_files.checksum_path(path).unlink(missing_ok=True)
        if checksum:
            shutil.copyfile(checkpoint_files.checksum_path(genuine), checkpoint_files.checksum_path(path))
        return path

    return make


def _load(path):
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _member_offset(path, part):
    """(byte offset, size) of the data of the largest zip member whose name contains `part` (torch stores
    members uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if part in i.filename), key=lambda i: i.file_size)
        header = path.read_bytes()[info.header_offset : info.header_offset + 30]
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        return info.header_offset + 30 + name_len + extra_len, info.file_size


# -- what fairseq writes --------------------------------------------------------------------------
def test_saved_checkpoint_has_a_matching_sha256sum_file(genuine):
    line = checkpoint_files.checksum_path(genuine).read_text()
    assert line == f"{checkpoint_files.sha256_of(genuine)}  checkpoint_last.pt\n"  # `sha256sum -c` format
    proc = subprocess.run(["sha256sum", "-c", line.split()[-1] + ".sha256"], cwd=genuine.parent, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(genuine.parent.glob("*.tmp"))
    assert "model" in _load(genuine)


def test_fairseq_copy_is_atomic_and_carries_the_checksum(genuine, tmp_path):
    from fairseq.file_io import PathManager

    dst = tmp_path / "checkpoint_best.pt"
    dst.write_bytes(b"old")
    assert PathManager.copy(str(genuine), str(dst), overwrite=True)
    assert dst.read_bytes() == genuine.read_bytes() and dst.stat().st_ino != genuine.stat().st_ino  # a copy
    assert checkpoint_files.read_digests(dst) == checkpoint_files.read_digests(genuine)
    checkpoint_files.verify(dst)


def test_copy_onto_a_full_disk_leaves_the_old_checkpoint_intact(genuine, tmp_path):
    """The reported failure: a full disk during the copy onto checkpoint_last.pt. Here a file-size limit
    (RLIMIT_FSIZE, in a forked child) makes the write fail half-way the way ENOSPC does."""
    from fairseq.file_io import PathManager

    old = tmp_path / "checkpoint_1_0.pt"
    checkpoint_files.save_atomically(old, lambda f: torch.save({"old": torch.zeros(3)}, f))
    dst = tmp_path / "checkpoint_last.pt"
    PathManager.copy(str(old), str(dst), overwrite=True)
    before = dst.read_bytes()
    limit = genuine.stat().st_size // 2
    assert limit > len(before)  # the limit allows the old file, not the new one
    pid = os.fork()
    if pid == 0:  # child: copy under the limit; exit 0 only if the copy failed with an OSError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            PathManager.copy(str(genuine), str(dst), overwrite=True)
            os._exit(2)
        except OSError:
            os._exit(0)
        except BaseException:
            os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert dst.read_bytes() == before  # the old checkpoint_last, whole
    checkpoint_files.verify(dst)
    assert not list(tmp_path.glob("*.tmp"))
    # control: without the patch, fairseq's copyfile truncates the destination first
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            PathManager.copy.__wrapped__(str(genuine), str(dst), overwrite=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert dst.stat().st_size == limit and dst.read_bytes() != before


def test_checksum_file_verifies_at_every_step_of_a_replacement(tmp_path):
    """publish(): a crash between any two of its renames leaves a file that verifies (old or new content)."""
    final = tmp_path / "checkpoint_last.pt"
    checkpoint_files.save_atomically(final, lambda f: torch.save({"v": torch.zeros(2)}, f))
    old_digest = checkpoint_files.sha256_of(final)
    tmp = tmp_path / "checkpoint_last.pt.tmp"
    torch.save({"v": torch.ones(2)}, tmp)
    new_digest = checkpoint_files.sha256_of(tmp)
    checkpoint_files._write_digests(final, [new_digest, old_digest])  # state after step (1)
    checkpoint_files.verify(final)  # old content
    os.replace(tmp, final)  # state after step (2)
    checkpoint_files._VERIFIED.clear()
    checkpoint_files.verify(final)  # new content
    checkpoint_files._write_digests(final, [old_digest])  # control: a checksum of other content
    checkpoint_files._VERIFIED.clear()
    with pytest.raises(CheckpointDamagedError):
        checkpoint_files.verify(final)


# -- damaged vs refused, with the file named ---------------------------------------------------------
def test_truncated_checkpoint_is_damaged_and_named(copy_of):
    for checksum in (True, False):
        path = copy_of(checksum=checksum)
        path.write_bytes(path.read_bytes()[: 278_528 if path.stat().st_size > 278_528 else 1000])
        with pytest.raises(CheckpointDamagedError, match=f"checkpoint {path} is damaged") as info:
            _load(path)
        assert ("SHA-256" if checksum else "not a complete torch archive") in str(info.value)
        assert "weights_only" not in str(info.value) and "report that global" not in str(info.value)


def test_text_file_is_damaged_not_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointDamagedError, match=f"{path} is damaged.*not a complete torch archive"):
        _load(path)


def test_flipped_tensor_bytes_are_caught_by_the_checksum(copy_of):
    """The reported failure: bytes flipped inside tensor data load silently in stock fairseq."""
    path = copy_of()
    offset, size = _member_offset(path, "/data/")
    assert size > 1000
    _flip(path, offset + 8)
    with pytest.raises(CheckpointDamagedError, match=f"checkpoint {path} is damaged: its SHA-256"):
        _load(path)
    # control: torch itself loads the damaged file without complaint
    state = torch.load(path, weights_only=False)
    assert "model" in state


def test_flipped_tensor_bytes_without_checksum_file_fail_the_zip_crc(copy_of):
    path = copy_of(checksum=False)
    offset, _ = _member_offset(path, "/data/")
    _flip(path, offset + 8)
    with pytest.raises(CheckpointDamagedError, match=r"member \S+/data/\d+ fails its CRC-32"):
        _load(path)


def test_flipped_pickle_byte_keeps_torchs_reason(copy_of):
    """Without a checksum or CRC to catch it first (the check reads the zip), torch's own reason is kept."""
    path = copy_of(checksum=False)
    offset, _ = _member_offset(path, "/data.pkl")
    data = bytearray(path.read_bytes())
    data[offset + 2] = 130  # an opcode the unpickler does not know
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamagedError, match="fails its CRC-32"):
        _load(path)
    err = checkpoint_files.load_error(path, _torch_error(path))
    assert isinstance(err, CheckpointDamagedError) and not isinstance(err, pickle.UnpicklingError)
    assert f"checkpoint {path} is damaged" in str(err) and "Unsupported operand 130" in str(err)


def _torch_error(path):
    try:
        torch.load(path, weights_only=True)
    except Exception as err:
        return err
    raise AssertionError("torch loaded a damaged pickle")


def test_refused_global_is_refused_not_damaged(copy_of, tmp_path):
    state = torch.load(copy_of(), weights_only=False)
    state["extra_state"]["hidden"] = os.system  # a pickled callable
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointRefusedError, match=f"refusing to load checkpoint {path}: it pickles posix.system"):
        _load(path)


# -- stale temp files and the resume fallback ------------------------------------------------------
def test_remove_stale_temps_only_touches_temp_files(tmp_path):
    keep = [tmp_path / n for n in ("checkpoint_last.pt", "checkpoint_last.pt.sha256", "notes.tmp")]
    stale = [tmp_path / n for n in ("checkpoint_1_9.pt.tmp", "checkpoint_last.pt.sha256.tmp")]
    for p in keep + stale:
        p.write_text("x")
    assert sorted(checkpoint_files.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_fallback_picks_the_newest_intact_checkpoint(copy_of):
    last = copy_of("checkpoint_last.pt")
    older, newer, broken = (copy_of(n) for n in ("checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_1_6.pt"))
    for i, p in enumerate((older, newer, broken)):
        os.utime(p, ns=(10**18 + i, 10**18 + i))
    broken.write_bytes(broken.read_bytes()[:5000])
    assert checkpoint_files.intact_or_newest_intact(last) == last
    last.write_bytes(b"")
    assert checkpoint_files.intact_or_newest_intact(last) == newer
    for p in (older, newer):
        p.write_bytes(b"x")
    with pytest.raises(CheckpointDamagedError, match="no intact checkpoint"):
        checkpoint_files.intact_or_newest_intact(last)


@pytest.fixture(scope="module")
def damaged_resume(sp_data, genuine, tmp_path_factory):
    """fairseq-train resuming a save dir whose checkpoint_last.pt is truncated (as the reported full disk
    left it), beside an intact checkpoint_1_0.pt and a stale temp file; SIGTERM once it has trained."""
    from fairseq.file_io import PathManager

    save = tmp_path_factory.mktemp("damaged_resume")
    intact, last = save / "checkpoint_1_0.pt", save / "checkpoint_last.pt"
    for dst in (intact, last):
        PathManager.copy(str(genuine), str(dst), overwrite=True)
    last.write_bytes(last.read_bytes()[:278_528])
    stale = save / "checkpoint_1_5.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    argv = [str(a) for a in sentence_prediction_args(sp_data, save, max_update=10_000)]
    proc = subprocess.Popen(
        [str(BIN / "fairseq-train"), *argv],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # a real SIGTERM from outside, as a scheduler sends it, after update 2
        lines.append(line)
        if '"num_updates": "2"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    return save, intact, stale, proc.returncode, "".join(lines)


@pytest.mark.e2e
def test_damaged_last_resumes_from_newest_intact_with_a_warning(damaged_resume):
    save, intact, stale, _, log = damaged_resume
    warning = next(line for line in log.splitlines() if "Resuming from" in line)
    assert f"checkpoint {save / 'checkpoint_last.pt'} is damaged" in warning and f"Resuming from {intact}" in warning
    assert f"Loaded checkpoint {intact} (epoch 1 @ 0 updates)" in log
    assert f"left by an interrupted save: {stale}" in log and not stale.exists()


@pytest.mark.e2e
def test_sigterm_saves_last_and_exits_with_the_preemption_code(damaged_resume):
    save, _, _, returncode, log = damaged_resume
    assert returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    trained = [int(r["num_updates"]) for r in json_logs(log) if "num_updates" in r and "loss" in r]
    assert trained and trained[-1] < 10_000
    state = _load(save / "checkpoint_last.pt")  # intact again, checksum and all
    assert state["optimizer_history"][-1]["num_updates"] == trained[-1]
    assert f"preempted (received SIGTERM): saved {save}/checkpoint_last.pt at update {trained[-1]}" in log
