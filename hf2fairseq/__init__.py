"""Hugging Face BERT-family checkpoints -> fairseq RoBERTa-architecture checkpoints.

Importing this package registers the fairseq model `hf_bert` (arch `hf_bert`): fairseq's RoBERTa with
BERT's LayerNorm eps (`--hf-bert-layer-norm-eps`, 1e-12), token-type embeddings (segment B = after the first
[SEP]) and the pretrained pooler as the initial dense of new classification heads (`--hf-bert-no-pooler-init`
turns that off), so a converted BERT computes exactly what transformers' BertModel computes, on single
sentences and pairs. The converter is `python -m hf2fairseq` (or `scripts/convert_hf_bert.py`).
"""

import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from hf2fairseq import model  # noqa: F401  (registers hf_bert)
