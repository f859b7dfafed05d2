"""Clean process exit when fairseq leaves a prefetch thread running.

fairseq prefetches batches in a daemon `BackgroundConsumer` thread (`--data-buffer-size`, default 10).
When a run ends while one is still collating (e.g. validation cut short by `--max-valid-steps`, or the
last epoch stopped by `--max-update`), CPython 3.11 kills that thread inside torch's C++ code at
interpreter shutdown, and the process dies with SIGABRT ("terminate called without an active
exception", exit -6) after training has finished: schedulers then report a finished job as failed.
At exit we ask each such thread to stop after its current batch and let it finish, before CPython
tears threads down (registered with atexit by `fairseq_patches.stop_prefetch_threads_at_exit`).
"""

from __future__ import annotations

import queue
import threading
import time


def stop_prefetch_threads(timeout_s: float = 10.0) -> None:
    """Ask every live fairseq prefetch thread to stop after its current batch; wait for it (bounded)."""
    from fairseq.data.iterators import BackgroundConsumer

    consumers = [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]
    for thread in consumers:
        thread._max_len = 0  # its loop breaks after the batch it is building
    deadline = time.monotonic() + timeout_s
    for thread in consumers:
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # make room, so its pending put (batch or end marker) does not block
                while True:
                    thread._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.05)
