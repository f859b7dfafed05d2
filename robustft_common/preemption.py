"""Preemption: SIGTERM or SIGUSR1 during training saves checkpoint_last.pt at the next update boundary and
exits with PREEMPTED_EXIT_CODE, so a requeued job resumes exactly where the preempted one stopped.

Clusters preempt with SIGTERM (SLURM, Kubernetes, torchrun's agent) or a signal chosen by the job (SLURM
`--signal=USR1@120`). The handler only records the signal; the training loop acts on it after the update
in flight and fairseq's own validation/save of that update (`fairseq_cli.train.validate_and_save`), so the
checkpoint holds a whole update and the data iterator's position after it, like an interval checkpoint.
With several ranks the signal may reach them at different times: at every update boundary the ranks
all-reduce (max) whether any has one, so all of them stop at the same update (one 1-element all-reduce per
update; none with one rank). A second signal while the first is pending has its default effect at once.
A run that reaches its end (`--max-update`, `--max-epoch`, early stopping) at that boundary finishes
normally (exit 0).

Installed by `fairseq_patches.save_on_preemption` when fairseq's train loop loads its checkpoint (the
step before its first update); before that, the signals keep their default effect.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL: "temporary failure, the user is invited to retry"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_pending: list = []  # names of the signals received since the run started (a list: mutable from the handler)


def start() -> None:
    """Forget signals of an earlier run in this process; catch SIGTERM/SIGUSR1 from now on."""
    _pending.clear()
    if threading.current_thread() is not threading.main_thread():
        logger.warning("training outside the main thread: SIGTERM/SIGUSR1 keep their default effect")
        return
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def _on_signal(signum, frame) -> None:
    if _pending:  # asked twice: stop now, the default way
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _pending.append(signal.Signals(signum).name)


def requested_by_any_rank(trainer) -> bool:
    """Whether this rank or any other has received a signal (collective: every rank calls it per update)."""
    import torch
    import torch.distributed as dist

    local = bool(_pending)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    flag = torch.tensor([int(local)], dtype=torch.int32, device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def save_and_exit(cfg, trainer, epoch_itr) -> None:
    """Write checkpoint_last.pt for the current update (every rank calls this), then SystemExit(75)."""
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    why = f"received {', '.join(_pending)}" if _pending else "another rank received a preemption signal"
    updates = trainer.get_num_updates()
    if cfg.checkpoint.no_save:
        logger.warning(f"preempted ({why}) at update {updates}; --no-save: nothing saved")
    else:
        only_last = copy.deepcopy(cfg.checkpoint)
        with open_dict(only_last):  # fairseq's own save, reduced to checkpoint_last (no val_loss: no best)
            only_last.no_epoch_checkpoints = True
            only_last.save_interval_updates = 0
            only_last.no_last_checkpoints = False
        checkpoint_utils.save_checkpoint(only_last, trainer, epoch_itr, None)
        logger.warning(
            f"preempted ({why}): saved {cfg.checkpoint.save_dir}/checkpoint_last{trainer.checkpoint_suffix}.pt at "
            f"update {updates}; exiting with code {PREEMPTED_EXIT_CODE} (rerun the same command to resume)"
        )
    raise SystemExit(PREEMPTED_EXIT_CODE)
