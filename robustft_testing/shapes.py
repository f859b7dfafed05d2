"""Model shapes shared by the tests and the benchmarks' tiny size."""

# 2 + 2 layers, dim 64: the tiny encoder-decoder of the BART / transformer tests (add --arch).
TINY_ENCODER_DECODER = (
    "--encoder-layers",
    "2",
    "--decoder-layers",
    "2",
    "--encoder-embed-dim",
    "64",
    "--decoder-embed-dim",
    "64",
    "--encoder-ffn-embed-dim",
    "128",
    "--decoder-ffn-embed-dim",
    "128",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
)
