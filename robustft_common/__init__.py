"""Mechanisms shared by every method of the plugin (imported, never re-written per method).

Importing this package checks the installed fairseq and applies the plugin's fairseq patches, all of them
in `fairseq_patches.py` (checkpoint loading under torch's weights_only, spectral-normalised heads,
optimizer parameter names, clean exit).
"""

from robustft_common.compat import check_fairseq

check_fairseq()

from robustft_common import fairseq_patches  # noqa: E402  (needs fairseq, checked above)

fairseq_patches.install()
