"""`hf_bert`: fairseq RoBERTa whose LayerNorms use BERT's eps (fairseq hard-codes 1e-5).

Same modules, parameter names and shapes as `roberta_base`, so a converted checkpoint loads into either;
only `hf_bert` reproduces transformers' hidden states to float precision (with eps 1e-5 the embedding
LayerNorm of MiniLM is off by ~7e-3, see docs/recipes.md).
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaModel, base_architecture
from torch import nn

DEFAULT_EPS = 1e-12


@register_model("hf_bert")
class HFBertModel(RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        parser.add_argument("--hf-bert-layer-norm-eps", type=float, metavar="EPS",
                            help=f"eps of every LayerNorm (BERT's layer_norm_eps; default {DEFAULT_EPS})")

    @classmethod
    def build_model(cls, args, task):
        eps = getattr(args, "hf_bert_layer_norm_eps", None)
        eps = DEFAULT_EPS if eps is None else eps
        if not eps > 0:
            raise ValueError(f"--hf-bert-layer-norm-eps must be > 0, got {eps}")
        model = super().build_model(args, task)
        set_layer_norm_eps(model, eps)
        return model


def set_layer_norm_eps(module: nn.Module, eps: float) -> int:
    """Set eps on every LayerNorm-like module (torch's and apex's fused); returns how many."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm) or type(sub).__name__ == "FusedLayerNorm":
            sub.eps = eps
            count += 1
    return count


@register_model_architecture("hf_bert", "hf_bert")
def hf_bert_architecture(args):
    if getattr(args, "hf_bert_layer_norm_eps", None) is None:
        args.hf_bert_layer_norm_eps = DEFAULT_EPS
    base_architecture(args)
