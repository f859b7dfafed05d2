"""Mechanisms shared by every method of the plugin (imported, never re-written per method).

Importing this package checks the installed fairseq and registers the globals that fairseq
checkpoints need under torch's safe ``weights_only`` loading.
"""
from robustft_common.compat import check_fairseq, register_checkpoint_safe_globals

check_fairseq()
register_checkpoint_safe_globals()
