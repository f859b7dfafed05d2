"""Hugging Face transformers <-> fairseq, both ways.

Importing this package registers the fairseq models `hf_bert` (arch `hf_bert`) and `hf_electra` (arch
`hf_electra`). `hf_bert` is fairseq's RoBERTa with BERT's LayerNorm eps (`--hf-bert-layer-norm-eps`, 1e-12),
token-type embeddings (segment B = after the first [SEP]) and the pretrained pooler as the initial dense of
new classification heads (`--hf-bert-no-pooler-init` turns that off), so a converted BERT computes exactly
what transformers' BertModel computes, on single sentences and pairs; `hf_electra` adds ELECTRA's embedding
projection. The converter (transformers -> fairseq: BERT, ELECTRA, RoBERTa, XLM-R) is `python -m hf2fairseq`
(or `scripts/convert_hf_bert.py`); the exporter (fine-tuned fairseq checkpoint -> transformers folder) is
`python -m hf2fairseq.export`. transformers itself is needed only by the RoBERTa / XLM-R import and by the
export (`pip install -e .[hf]`); the fairseq plugin never imports it.
"""

import robustft_common  # noqa: F401  (fairseq check + checkpoint safe globals)
from hf2fairseq import electra, model  # noqa: F401  (registers hf_bert, hf_electra)
