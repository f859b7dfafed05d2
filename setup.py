"""Robust fine-tuning plugin for fairseq: R3F/R4F, HyPe, PATS (+ NoisyTune, SAGE), Hyperdecoders."""

from setuptools import find_packages, setup

PACKAGES = [
    "robustft",
    "robustft_common",
    "rxf_src",
    "hype_src",
    "pats_src",
    "hyperdecoder_src",
    "glue_preprocess",
    "seq2seq_preprocess",  # summarisation / XNLI releases -> binarized fairseq data (issue 16)
    "baselines_src",  # R-Drop, NEFTune, Mixout, ChildTuning, SMART, FreeLB (issue 18)
    "hf2fairseq",
    "robustft_experiments",  # sweeps, reports and seed statistics behind scripts/ (not a user dir)
    "robustft_testing",  # test-data builders for tests, scripts/fp16_check.py, benchmarks (not a user dir)
]

setup(
    name="robustft",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=[p for p in find_packages(include=[f"{top}*" for top in PACKAGES])],
    # fairseq itself is installed by `make install` with --no-deps (its metadata pulls torchaudio);
    # the plugin checks its version at import time.
    install_requires=["torch>=2.1", "numpy", "sentencepiece", "tokenizers", "safetensors"],
    # `pip install -e .[hf]`: Hugging Face transformers for hf2fairseq's RoBERTa / XLM-R import and the export
    # to transformers (hf2fairseq/hf_extra.py); the fairseq plugin never imports it. protobuf reads a
    # SentencePiece model's normaliser for XLM-R tokenizers.
    extras_require={"hf": ["transformers>=5,<6", "protobuf"]},
    entry_points={
        "console_scripts": [
            "glue-preprocess=glue_preprocess.__main__:main",
            "seq2seq-preprocess=seq2seq_preprocess.__main__:main",
        ]
    },
)
