"""Model shapes shared by the tests, scripts/fp16_check.py and the benchmarks' tiny size."""

# 2 layers, dim 64: the tiny RoBERTa every end-to-end sentence-prediction test trains (add --max-positions).
TINY_ROBERTA = (
    "--arch",
    "roberta_base",
    "--encoder-layers",
    "2",
    "--encoder-embed-dim",
    "64",
    "--encoder-ffn-embed-dim",
    "128",
    "--encoder-attention-heads",
    "2",
)

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
