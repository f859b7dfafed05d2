"""Mechanisms shared by every method of the plugin (imported, never re-written per method).

Importing this package checks the installed fairseq, registers the globals that fairseq
checkpoints need under torch's safe ``weights_only`` loading, and makes processes exit cleanly when
fairseq leaves a batch-prefetch thread running (shutdown.py).
"""
from robustft_common.compat import check_fairseq, register_checkpoint_safe_globals

check_fairseq()
register_checkpoint_safe_globals()

from robustft_common import shutdown  # noqa: E402  (needs fairseq, checked above)

shutdown.install()
