"""`hf_electra`: `hf_bert` plus ELECTRA's embedding projection, for converted ELECTRA discriminators.

ELECTRA (Clark et al., 2020) is BERT with two differences that matter here:
1. Its embeddings (tokens, positions, token types, their LayerNorm) live in a smaller space
   (`embedding_size`, e.g. 128 for ELECTRA-small) and a linear `embeddings_project` maps them to the
   Transformer's width (transformers' ElectraModel.forward: embeddings -> dropout -> project -> layers).
   fairseq's TransformerEncoder sizes the positions and `layernorm_embedding` by the token embedding's
   width (fairseq/models/transformer/transformer_encoder.py:51-69) and its layers by `--encoder-embed-dim`,
   so only the projection is missing: `ProjectedTransformerEncoder.forward_embedding` runs fairseq's own
   `forward_embedding` (tokens + positions [+ segments] -> LayerNorm -> dropout) and then the projection.
2. No pooler; its classification head is dropout -> dense -> GELU -> dropout -> out_proj
   (ElectraClassificationHead), i.e. fairseq's RobertaClassificationHead with `--pooler-activation-fn gelu`
   (this arch's default).

The discriminator's replaced-token head is not a fine-tuning component and is not converted; the MLM head
fairseq's RoBERTa carries cannot be tied to embeddings of another width, so it is untied (untrained,
unused by sentence prediction).
"""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaEncoder
from fairseq.models.transformer import TransformerEncoder
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from omegaconf import OmegaConf
from torch import nn

from hf2fairseq.model import HFBertModel, hf_bert_architecture
from robustft_common.validation import require


class ProjectedTransformerEncoder(TransformerEncoder):
    """fairseq's TransformerEncoder whose embedding output is projected to the layers' width."""

    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(args, dictionary, embed_tokens)
        self.embed_project = nn.Linear(embed_tokens.embedding_dim, args.encoder_embed_dim)

    def forward_embedding(self, src_tokens, token_embedding=None):
        x, embed = super().forward_embedding(src_tokens, token_embedding)
        return self.embed_project(x), embed


class ElectraEncoder(RobertaEncoder):
    """RobertaEncoder with token embeddings of `--hf-electra-embedding-dim` and the projection above."""

    def build_embedding(self, vocab_size, embedding_dim, padding_idx):
        return nn.Embedding(vocab_size, self.args.hf_electra_embedding_dim, padding_idx)

    def build_encoder(self, args, dictionary, embed_tokens):
        if embed_tokens.embedding_dim == args.encoder_embed_dim:  # ELECTRA-large: no embeddings_project
            return super().build_encoder(args, dictionary, embed_tokens)
        encoder = ProjectedTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)  # as RobertaEncoder.build_encoder (roberta/model.py:569-572)
        return encoder


@register_model("hf_electra")
class HFElectraModel(HFBertModel):
    @staticmethod
    def add_args(parser):
        HFBertModel.add_args(parser)
        parser.add_argument(
            "--hf-electra-embedding-dim",
            type=int,
            metavar="D",
            help="width of the token/position/segment embeddings (ELECTRA's embedding_size); a linear "
            "projection maps them to --encoder-embed-dim (default: --encoder-embed-dim, no projection)",
        )

    @classmethod
    def build_model(cls, args, task):
        """RobertaModel.build_model (fairseq/models/roberta/model.py:220-242) with ElectraEncoder."""
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        hf_electra_architecture(args)
        if getattr(args, "max_positions", None) is None:
            args.max_positions = getattr(args, "tokens_per_sample", None) or task.max_positions()
        encoder = ElectraEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)


@register_model_architecture("hf_electra", "hf_electra")
def hf_electra_architecture(args):
    args.pooler_activation_fn = getattr(args, "pooler_activation_fn", None) or "gelu"  # ElectraClassificationHead
    args.hf_bert_no_pooler_init = True  # ELECTRA has no pooler
    hf_bert_architecture(args)
    if getattr(args, "hf_electra_embedding_dim", None) is None:
        args.hf_electra_embedding_dim = args.encoder_embed_dim
    require(
        args.hf_electra_embedding_dim > 0,
        "--hf-electra-embedding-dim",
        f"must be > 0 (ELECTRA's embedding_size), got {args.hf_electra_embedding_dim}",
    )
    if args.hf_electra_embedding_dim != args.encoder_embed_dim:
        args.untie_weights_roberta = True  # an LM head of the layers' width cannot share narrower embeddings
