"""Hugging Face BERT-family checkpoints -> fairseq RoBERTa-architecture checkpoints.

Importing this package registers the fairseq model `hf_bert` (arch `hf_bert`): fairseq's RoBERTa with
a configurable LayerNorm eps (`--hf-bert-layer-norm-eps`, BERT's 1e-12), so a converted BERT computes
exactly what transformers' BertModel computes. The converter is `python -m hf2fairseq`
(or `scripts/convert_hf_bert.py`).
"""
import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from hf2fairseq import model  # noqa: F401  (registers hf_bert)
