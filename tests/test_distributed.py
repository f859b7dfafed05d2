"""Data parallel on CPU (2 processes, gloo): every method finishes, logs finite losses and keeps its
replicas bit-identical (parameters, buffers and optimizer state) under `--ddp-backend legacy_ddp`, and
under PyTorch DDP (`c10d`) with the one-line CPU device fix that stock fairseq lacks (docs/distributed.md).

Cost: fairseq's imports dominate a tiny run, so each rank is ONE python process that trains every
method in turn (`python -m tests.test_distributed JOBS.json`, see `launcher_main`): 2 processes for the
whole matrix instead of 2 per method. The same launcher runs the resume matrix (test_resume_exact.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from robustft_common.methods import method_flags
from robustft_testing import forkserver
from robustft_testing.synthetic_data import toy_classification
from tests.fairseq_helpers import REPO, json_logs, sentence_prediction_args, tiny_run_flags

# fairseq-train runs / training in-process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

MARK = "@@@"  # launcher lines: "@@@ JOB name", "@@@ ERROR name: message", "@@@ DONE"

# ---------------------------------------------------------------------------------------------------
# tiny data, binarized in-process (fairseq-preprocess costs ~5 s of imports per call)


def make_sp_data(root: Path, n_train=48, n_valid=16) -> Path:
    """RoBERTa GLUE layout (input0/, label/) like fairseq-preprocess --only-source writes it."""
    return toy_classification(root, n_train, n_valid)[0]


def make_t2t_data(root: Path, n_train=48, n_valid=16) -> Path:
    """glue_preprocess's text2text layout (joined src/tgt dictionary) for the hyperdecoder task."""
    return toy_classification(root, n_train, n_valid)[1]


# ---------------------------------------------------------------------------------------------------
# the method matrix: each method's flags from the method registry at test scale (noise large enough to
# measure on a tiny random model; dropout stays at its 0.1 default: its RNG is part of what must match).
# "vanilla" here is stock fairseq (sentence_prediction + adam), also the base the combination jobs extend.
TEST_SCALE = {"--eps": "1e-2", "--hype-eps": "1e-2", "--pats-noise": "1e-3", "--dropout": None}


def registry_flags(method: str) -> list:
    """The registry's flags of `method` with the test-scale values of TEST_SCALE (where it has the flag)."""
    flags = method_flags(method)
    return method_flags(method, {k: v for k, v in TEST_SCALE.items() if k in flags})


SENTENCE_PREDICTION_METHODS = {
    "vanilla": [],
    "r3f": registry_flags("r3f"),
    "r4f": registry_flags("r4f"),
    "hype": registry_flags("hype_n"),
    "adamax_pats": [*registry_flags("pats"), "--pats-log-stats"],
    "adamax_sage": registry_flags("sage"),
    "rdrop": registry_flags("rdrop"),
    "neftune": registry_flags("neftune"),
    "mixout": registry_flags("mixout"),
    "childtuning_f": registry_flags("childtuning_f"),
    "childtuning_d": registry_flags("childtuning_d"),
    "smart": registry_flags("smart"),
    "freelb": registry_flags("freelb"),
}
SEQ2SEQ_METHODS = {
    "hyperdecoder": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "hyperdecoder_r3f": [
        "--criterion",
        "label_smoothed_cross_entropy_r3f",
        "--label-smoothing",
        "0.1",
        "--eps",
        "1e-2",
    ],
    "hyperdecoder_rdrop": ["--criterion", "label_smoothed_cross_entropy_rdrop", "--label-smoothing", "0.1"],
}
METHODS = [*SENTENCE_PREDICTION_METHODS, *SEQ2SEQ_METHODS]
# methods combined in one run, with gradient accumulation (c10d's no_sync path)
COMBO = [
    "--criterion",
    "sentence_prediction_r3f",
    "--eps",
    "1e-2",
    "--hype-type",
    "normal",
    "--hype-eps",
    "1e-2",
    "--optimizer",
    "adamax_pats",
    "--pats-noise",
    "1e-3",
    "--update-freq",
    "2",
    "--batch-size",
    "8",
]


def method_argv(method: str, sp_data: Path, t2t_data: Path, save_dir: Path, max_update: int, *extra):
    """Full fairseq-train argv of a tiny CPU run of `method` (sentence prediction or text-to-text)."""
    if method in SENTENCE_PREDICTION_METHODS:
        args = sentence_prediction_args(sp_data, save_dir, *SENTENCE_PREDICTION_METHODS[method], max_update=max_update)
    else:
        args = [
            t2t_data,
            "--cpu",
            "--user-dir",
            REPO / "robustft",
            "--task",
            "hyperdecoder_glue",
            "-s",
            "src",
            "-t",
            "tgt",
            "--arch",
            "hyperdecoder_bart_tiny",
            *SEQ2SEQ_METHODS[method],
            *tiny_run_flags(save_dir, max_update),
        ]
    return [str(a) for a in (*args, *extra)]


# ---------------------------------------------------------------------------------------------------
# launcher: one process trains a list of jobs through fairseq_cli.train.cli_main


class _CpuDDP:
    """torch DDP with device_ids/output_device dropped for CPU modules.

    fairseq passes `device_ids=[device_id]` unconditionally (fairseq/models/distributed_fairseq_model.py:60-64),
    which torch rejects for CPU modules; everything else about c10d is unchanged.
    """

    def __new__(cls, module, device_ids=None, output_device=None, **kwargs):
        import torch

        return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


def _signal_after(train_step, update: int, rank: int, name: str):
    """Trainer.train_step that sends signal `name` to its own process once update `update` is done on `rank`
    (preemption tests: the signal arrives between two updates, deterministically)."""
    import signal

    import torch.distributed as dist

    def step(self, *args, **kwargs):
        out = train_step(self, *args, **kwargs)
        if self.get_num_updates() == update and dist.get_rank() == rank:
            os.kill(os.getpid(), getattr(signal, name))
        return out

    return step


def _run_job(job) -> None:
    import torch
    from fairseq import checkpoint_utils
    from fairseq.models import distributed_fairseq_model
    from fairseq.trainer import Trainer
    from fairseq_cli import train

    state = {}
    original_save = checkpoint_utils.save_checkpoint

    def save_checkpoint(cfg, trainer, *args, **kwargs):
        # every rank gets here; only rank 0 writes: keep this rank's own copy of the latest state
        state["model"] = {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()}
        state["optimizer"] = trainer.optimizer.state_dict()
        state["num_updates"] = trainer.get_num_updates()
        return original_save(cfg, trainer, *args, **kwargs)

    original_ddp = distributed_fairseq_model.DistributedDataParallel
    original_step = Trainer.train_step
    checkpoint_utils.save_checkpoint = save_checkpoint
    if job.get("cpu_c10d"):
        distributed_fairseq_model.DistributedDataParallel = _CpuDDP
    if job.get("signal"):  # {"update": n, "rank": r, "name": "SIGUSR1"}: a real signal to this process
        Trainer.train_step = _signal_after(original_step, **job["signal"])
    if hasattr(original_save, "best"):  # fairseq keeps the best score on the function: per run here
        del original_save.best
    try:
        sys.argv = ["fairseq-train", *job["argv"]]
        train.cli_main()
    finally:
        checkpoint_utils.save_checkpoint = original_save
        distributed_fairseq_model.DistributedDataParallel = original_ddp
        Trainer.train_step = original_step
    if job.get("dump"):
        torch.save(state, job["dump"])


def launcher_main(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    for job in jobs:
        print(f"{MARK} JOB {job['name']}", flush=True)
        try:
            _run_job(job)
        except BaseException as err:  # SystemExit too: fairseq exits on some errors
            message = f"{type(err).__name__}: {err}".replace("\n", " ")
            print(f"{MARK} ERROR {job['name']}: {message}", flush=True)
            if not job.get("expect_error"):
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)  # a rank that stops makes its peers' collectives fail instead of hang
    print(f"{MARK} DONE", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(jobs, workdir: Path, ranks=(None,), timeout=900):
    """Run `jobs` in one launcher process per rank (rank None = not distributed); returns the outputs.

    Distributed jobs get the gloo flags here; a job's argv must not carry them.
    """
    port = free_port()
    procs = []
    for rank in ranks:
        rank_jobs = []
        for job in jobs:
            job = dict(job)
            if rank is not None:
                job["argv"] = [
                    *job["argv"],
                    "--distributed-world-size",
                    str(len(ranks)),
                    "--distributed-rank",
                    str(rank),
                    "--distributed-backend",
                    "gloo",
                    "--distributed-init-method",
                    f"tcp://127.0.0.1:{port}",
                    "--distributed-no-spawn",
                ]
                if job.get("dump"):
                    job["dump"] = str(job["dump"]).format(rank=rank)
            rank_jobs.append(job)
        jobs_file = workdir / f"jobs_rank{rank}.json"
        jobs_file.write_text(json.dumps(rank_jobs))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_distributed", str(jobs_file)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and f"{MARK} DONE" in out, out[-8000:]
    return outputs


def split_by_job(output: str) -> dict:
    """{job name: its part of a launcher's output}."""
    parts, name = {}, None
    for line in output.splitlines():
        if line.startswith(f"{MARK} JOB "):
            name = line[len(f"{MARK} JOB ") :].strip()
            parts[name] = []
        elif name is not None:
            parts[name].append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


def job_error(part: str):
    for line in part.splitlines():
        if line.startswith(f"{MARK} ERROR "):
            return line.split(": ", 1)[1]
    return None


def load_state(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def assert_states_equal(a, b, what=""):
    """Bit-exact equality of nested dicts/lists of tensors and plain values."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (what, sorted(a), sorted(b))
        for k in a:
            assert_states_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), what
    else:
        assert a == b, (what, a, b)


def train_records(part: str):
    return [r for r in json_logs(part) if "num_updates" in r and "loss" in r]


# ---------------------------------------------------------------------------------------------------
# the tests

MAX_UPDATE = 4  # 48 examples / (2 ranks x 16) = 2 updates per epoch: the run crosses an epoch boundary


def _job(name, method, data, tmp, *extra, expect_error=False, cpu_c10d=False):
    sp, t2t = data
    return {
        "name": name,
        "argv": method_argv(method, sp, t2t, tmp / name, MAX_UPDATE, *extra),
        "dump": str(tmp / f"{name}.rank{{rank}}.pt"),
        "expect_error": expect_error,
        "cpu_c10d": cpu_c10d,
    }


# c10d without --find-unused-parameters: RoBERTa's lm_head gets no gradient in sentence prediction, so
# every RoBERTa method fails; the hyperdecoder (frozen backbone: only used parameters are trainable) runs.
C10D_NOFIND_FAILS = ["vanilla", "r3f"]
C10D_NOFIND_RUNS = ["hyperdecoder", "hyperdecoder_r3f"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_sp_data(tmp), make_t2t_data(tmp)
    jobs = [_job(f"legacy_{m}", m, data, tmp) for m in METHODS]
    jobs += [
        _job(f"c10d_{m}", m, data, tmp, "--ddp-backend", "c10d", "--find-unused-parameters", cpu_c10d=True)
        for m in METHODS
    ]
    jobs += [_job(f"c10dnofind_{m}", m, data, tmp, "--ddp-backend", "c10d", cpu_c10d=True) for m in C10D_NOFIND_RUNS]
    jobs += [
        _job(
            f"{backend}_combo",
            "vanilla",
            data,
            tmp,
            *COMBO,
            *COMBO_BACKENDS[backend],
            "--save-interval-updates",
            "1",
            cpu_c10d=backend == "c10d",
        )
        for backend in COMBO_BACKENDS
    ]
    # expected failures last: a run that dies mid-step is the only one that could leave a collective open
    jobs.append(_job("c10d_stock_cpu", "vanilla", data, tmp, "--ddp-backend", "c10d", expect_error=True))
    jobs += [
        _job(f"c10dnofind_{m}", m, data, tmp, "--ddp-backend", "c10d", cpu_c10d=True, expect_error=True)
        for m in C10D_NOFIND_FAILS
    ]
    outputs = run_launcher(jobs, tmp, ranks=(0, 1))
    return tmp, data, [split_by_job(o) for o in outputs]


COMBO_BACKENDS = {"legacy": [], "c10d": ["--ddp-backend", "c10d", "--find-unused-parameters"]}


# Resume on 2 ranks: rank 0 reads the checkpoint and fairseq broadcasts it (fairseq/distributed/utils.py:805,
# torch.load under weights_only on the other ranks), unless every rank reads the file itself.
RESUME_VARIANTS = {
    "all_ranks_read_legacy": ("legacy", ["--load-checkpoint-on-all-dp-ranks"]),
    "all_ranks_read_c10d": ("c10d", ["--load-checkpoint-on-all-dp-ranks"]),
    # rank 0 reads and broadcasts: needs the broadcast globals in robustft_common/compat.py
    "broadcast_legacy": ("legacy", []),
}


@pytest.fixture(scope="module")
def ddp_resumed(ddp_runs):
    """2-rank runs resumed after update 1 from the straight combo runs' checkpoint_1_1.pt."""
    tmp, data, _ = ddp_runs
    jobs = []
    for variant, (backend, extra) in RESUME_VARIANTS.items():
        name = f"resumed_{variant}"
        (tmp / name).mkdir()
        shutil.copy(tmp / f"{backend}_combo" / "checkpoint_1_1.pt", tmp / name / "checkpoint_last.pt")
        jobs.append(
            _job(
                name,
                "vanilla",
                data,
                tmp,
                *COMBO,
                *COMBO_BACKENDS[backend],
                "--save-interval-updates",
                "1",
                *extra,
                cpu_c10d=backend == "c10d",
                expect_error=variant.startswith("broadcast"),
            )
        )
    outputs = run_launcher(jobs, tmp, ranks=(0, 1))
    return tmp, [split_by_job(o) for o in outputs]


@pytest.mark.parametrize(
    "name",
    [
        *(f"legacy_{m}" for m in METHODS),
        *(f"c10d_{m}" for m in METHODS),
        *(f"c10dnofind_{m}" for m in C10D_NOFIND_RUNS),
        "legacy_combo",
        "c10d_combo",
    ],
)
def test_replicas_stay_bit_identical(ddp_runs, name):
    tmp, _, (rank0, rank1) = ddp_runs
    assert job_error(rank0[name]) is None and job_error(rank1[name]) is None
    records = train_records(rank0[name])
    assert [int(r["num_updates"]) for r in records] == list(range(1, MAX_UPDATE + 1)), rank0[name][-3000:]
    assert all(math.isfinite(float(r["loss"])) for r in records)
    a, b = load_state(tmp / f"{name}.rank0.pt"), load_state(tmp / f"{name}.rank1.pt")
    assert a["num_updates"] == b["num_updates"] == MAX_UPDATE
    assert_states_equal(a["model"], b["model"], "model")
    assert_states_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    # training happened on both: the two ranks saw different batches, yet hold the same weights
    assert float(records[0]["bsz"]) == 32  # the logged batch is the sum over the 2 ranks


def test_method_specific_noise_really_ran_under_ddp(ddp_runs):
    _, _, (rank0, _) = ddp_runs
    for name, key in (
        ("legacy_r3f", "r3f_noise_effective"),
        ("legacy_hype", "hype_noise_effective"),
        ("legacy_hyperdecoder_r3f", "r3f_noise_effective"),
        ("legacy_adamax_pats", "pats_frac_noised"),
        ("legacy_neftune", "neftune_noise_effective"),
    ):
        values = [float(r[key]) for r in train_records(rank0[name]) if key in r]
        assert values and min(values) > 0.3, (name, key, values)
    for name in ("legacy_rdrop", "legacy_hyperdecoder_rdrop"):  # R-Drop's KL term is small, but there
        values = [float(r["rdrop_kl"]) for r in train_records(rank0[name]) if "rdrop_kl" in r]
        assert values and min(values) > 0, (name, values)
    for name, key in (
        ("legacy_smart", "smart_adv"),
        ("c10d_smart", "smart_bregman"),
        ("c10d_freelb", "freelb_delta_norm"),
    ):
        values = [float(r[key]) for r in train_records(rank0[name]) if key in r]
        assert values and min(values) > 0, (name, key, values)
    kept = [float(r["childtuning_kept"]) for r in train_records(rank0["c10d_childtuning_d"])]
    assert kept and all(abs(k - 0.3) < 0.01 for k in kept), kept  # one child network for both ranks


def test_c10d_on_cpu_fails_in_stock_fairseq(ddp_runs):
    """What a user gets with `--ddp-backend c10d --cpu` (the default backend): torch's device_ids error."""
    _, _, ranks = ddp_runs
    for parts in ranks:
        error = job_error(parts["c10d_stock_cpu"])
        assert error and "device_ids" in error and "DistributedDataParallel" in error, error


@pytest.mark.parametrize("method", C10D_NOFIND_FAILS)
def test_c10d_roberta_needs_find_unused_parameters(ddp_runs, method):
    _, _, (rank0, rank1) = ddp_runs
    errors = [job_error(p[f"c10dnofind_{method}"]) for p in (rank0, rank1)]
    assert all(e and "find_unused_parameters" in e for e in errors), errors


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_two_rank_resume_is_exact(ddp_runs, ddp_resumed, variant):
    tmp, (rank0, rank1) = ddp_resumed
    _, _, (straight0, _) = ddp_runs
    backend = RESUME_VARIANTS[variant][0]
    name = f"resumed_{variant}"
    assert job_error(rank0[name]) is None and job_error(rank1[name]) is None, (job_error(rank1[name]) or "")[-600:]
    assert "@ 1 updates" in rank0[name]
    reference = load_state(tmp / f"{backend}_combo.rank0.pt")
    for rank in (0, 1):
        state = load_state(tmp / f"{name}.rank{rank}.pt")
        assert state["num_updates"] == MAX_UPDATE
        assert_states_equal(reference["model"], state["model"], f"rank{rank}.model")
        assert_states_equal(reference["optimizer"]["state"], state["optimizer"]["state"], f"rank{rank}.optimizer")
    timing = {"wps", "ups", "train_wall", "wall", "gb_free"}
    straight = {int(r["num_updates"]): r for r in train_records(straight0[f"{backend}_combo"])}
    resumed = {int(r["num_updates"]): r for r in train_records(rank0[name])}
    assert sorted(resumed) == list(range(2, MAX_UPDATE + 1))
    for step, rec in resumed.items():
        assert {k: v for k, v in rec.items() if k not in timing} == {
            k: v for k, v in straight[step].items() if k not in timing
        }, step


# ---------------------------------------------------------------------------------------------------
# scripts/fp16_check.py is GPU-only; its --cpu-smoke mode runs the same code path on CPU


def test_fp16_check_script_cpu_smoke(tmp_path):
    out = tmp_path / "fp16"
    proc = forkserver.run(
        [sys.executable, REPO / "scripts" / "fp16_check.py", "--out-dir", out, "--cpu-smoke"],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=420,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    # every registry method (NoisyTune right after vanilla_adamax, whose checkpoint it starts from), then the
    # seq2seq ones
    assert [(r["method"], r["mode"]) for r in summary["results"]] == [
        (m, "memory_efficient_fp16")
        for m in (
            "vanilla",
            "r3f",
            "r4f",
            "hype_n",
            "hype_u",
            "hype_u_official",
            "hype_r3f",
            "rdrop",
            "neftune",
            "mixout",
            "childtuning_f",
            "childtuning_d",
            "smart",
            "freelb",
            "vanilla_adamax",
            "noisytune",
            "sage",
            "pats",
            "hyperdecoder",
            "hyperdecoder_r3f",
        )
    ]
    for r in summary["results"]:
        assert r["ok"] and r["updates"] == 2, r
    noise = {r["method"]: r["noise"] for r in summary["results"]}
    for method, key in (
        ("r3f", "r3f_noise_effective"),
        ("hype_n", "hype_noise_effective"),
        ("hype_u_official", "hype_noise_effective"),
        ("hype_r3f", "hype_noise_effective"),
        ("hype_r3f", "r3f_noise_effective"),
        ("pats", "pats_frac_noised"),
        ("hyperdecoder_r3f", "r3f_noise_effective"),
        ("noisytune", "noisytune_applied"),
        ("neftune", "neftune_noise_effective"),
    ):
        assert 0.0 < noise[method][key]["mean"] <= 1.0, (method, noise[method])


if __name__ == "__main__":
    launcher_main(sys.argv[1])
