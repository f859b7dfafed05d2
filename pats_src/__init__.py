"""pats_src: fairseq user dir (`--user-dir pats_src`). Importing it registers its components."""
import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
