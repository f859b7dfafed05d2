"""Preemption (robustft_common/preemption.py): a signal saves checkpoint_last.pt at the next update boundary
and exits with code 75; rerunning the same command resumes bit-identically to an uninterrupted run.

2 gloo ranks, `--ddp-backend legacy_ddp`, R3F + HyPe + PATS with `--update-freq 2` (dropout, noise and
optimizer EMAs all have state to get right). A real SIGUSR1 reaches rank 1 only, after its second update
(`tests/test_distributed._signal_after`): rank 0 never sees a signal, so both stopping at update 2 is the
ranks' agreement at work. The straight, preempted and resumed runs share one launcher process per rank.
The single-process exit code under an external SIGTERM: tests/test_checkpoint_files.py.
"""

import signal

import pytest

from robustft_common import preemption
from robustft_common.preemption import PREEMPTED_EXIT_CODE
from tests.test_distributed import (
    COMBO,
    assert_states_equal,
    job_error,
    load_state,
    make_sp_data,
    make_t2t_data,
    method_argv,
    run_launcher,
    split_by_job,
    train_records,
)

N = 4  # 48 examples / (2 ranks x 8 x update-freq 2) = 2 updates per epoch: the resumed half starts epoch 2
STOP = 2
TIMING = {"wps", "ups", "wpb_per_sec", "train_wall", "wall", "gb_free"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preemption")
    sp, t2t = make_sp_data(tmp), make_t2t_data(tmp)

    def job(name, save_dir, **extra):
        argv = method_argv("vanilla", sp, t2t, tmp / save_dir, N, *COMBO)
        return {"name": name, "argv": argv, "dump": str(tmp / f"{name}.rank{{rank}}.pt"), **extra}

    jobs = [
        job("straight", "straight"),
        job("preempted", "requeued", signal={"update": STOP, "rank": 1, "name": "SIGUSR1"}, expect_error=True),
        job("resumed", "requeued"),  # the same command again, as a requeue script runs it
    ]
    outputs = run_launcher(jobs, tmp, ranks=(0, 1))
    return tmp, [split_by_job(o) for o in outputs]


@pytest.mark.e2e
def test_signal_on_one_rank_stops_both_at_the_same_update(runs):
    _, ranks = runs
    for rank, parts in enumerate(ranks):
        assert job_error(parts["preempted"]) == f"SystemExit: {PREEMPTED_EXIT_CODE}", parts["preempted"][-3000:]
        trained = [int(r["num_updates"]) for r in train_records(parts["preempted"])]
        assert rank > 0 or trained == list(range(1, STOP + 1))  # rank 0 logs the training records
    assert "preempted (received SIGUSR1)" in ranks[1]["preempted"]
    assert "preempted (another rank received a preemption signal): saved" in ranks[0]["preempted"]
    assert f"checkpoint_last.pt at update {STOP}; exiting with code {PREEMPTED_EXIT_CODE}" in ranks[0]["preempted"]


@pytest.mark.e2e
def test_resume_after_preemption_is_bit_identical(runs):
    tmp, (rank0, rank1) = runs
    assert job_error(rank0["resumed"]) is None and job_error(rank1["resumed"]) is None
    assert f"@ {STOP} updates" in rank0["resumed"] and "Loaded checkpoint" in rank0["resumed"]
    reference = load_state(tmp / "straight.rank0.pt")
    assert reference["num_updates"] == N
    for rank in (0, 1):
        state = load_state(tmp / f"resumed.rank{rank}.pt")
        assert state["num_updates"] == N
        assert_states_equal(reference["model"], state["model"], f"rank{rank}.model")
        assert_states_equal(reference["optimizer"]["state"], state["optimizer"]["state"], f"rank{rank}.optimizer")
    straight = {int(r["num_updates"]): r for r in train_records(rank0["straight"])}
    resumed = {int(r["num_updates"]): r for r in train_records(rank0["resumed"])}
    assert sorted(resumed) == list(range(STOP + 1, N + 1))
    for step, rec in resumed.items():
        keys = set(rec) - TIMING
        assert {k: rec[k] for k in keys} == {k: straight[step][k] for k in keys}, step


def test_second_signal_has_its_default_effect_at_once(monkeypatch):
    """The first signal is recorded; a second one (a scheduler that stops waiting) is not swallowed."""
    import os

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(signal, "signal", lambda sig, handler: sent.append((sig, handler)))
    preemption._pending.clear()
    preemption._on_signal(signal.SIGUSR1, None)
    assert preemption._pending == ["SIGUSR1"] and sent == []
    preemption._on_signal(signal.SIGTERM, None)
    assert sent == [(signal.SIGTERM, signal.SIG_DFL), (os.getpid(), signal.SIGTERM)]
    preemption._pending.clear()
