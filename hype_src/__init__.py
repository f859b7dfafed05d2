"""hype_src: fairseq user dir (`--user-dir hype_src`). Importing it registers its components."""
import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
