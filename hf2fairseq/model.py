"""`hf_bert`: fairseq RoBERTa plus the three things BERT has and fairseq's RoBERTa lacks.

1. LayerNorm eps (`--hf-bert-layer-norm-eps`, BERT's 1e-12; fairseq hard-codes 1e-5): with eps 1e-5 the
   embedding LayerNorm of MiniLM is off by ~7e-3 (docs/recipes.md).
2. Token-type (segment) embeddings (`--hf-bert-type-vocab-size`, BERT's type_vocab_size 2): BERT adds
   token_type_embeddings[0] to `[CLS] A [SEP]` and [1] to `B [SEP]`. The table lives in
   `encoder.sentence_encoder.embed_segments` and is added to the position embeddings by a forward hook on
   `embed_positions`: fairseq's `TransformerEncoder.forward_embedding` (fairseq/models/transformer/
   transformer_encoder.py:125-129) sums `embed_scale * embed_tokens(x) + embed_positions(x)` and has no
   argument for a third term, but `embed_positions` is called with the token ids, which is all the segment
   ids need, and its output lands in that very sum (before `layernorm_embedding`). So no fairseq forward is
   copied, and hooks on the token embeddings or on `layernorm_embedding` (R3F's noise) see the same sum.
   Segment 1 = every non-pad token after the first separator (`</s>` = `[SEP]`, the dictionary's eos):
   `--init-token 0` without `--separator-token` builds BERT's `[CLS] A [SEP] B [SEP]`; with
   `--separator-token 2` (RoBERTa's layout, `<s> A </s> </s> B </s>`) the extra `</s>` joins segment B.
3. BERT's pretrained pooler (dense + tanh on `[CLS]`), kept as buffers (`pooler.*`, not trained, not used
   in forward) to initialise the dense layer of every classification head the checkpoint being loaded lacks,
   as `BertForSequenceClassification` starts from the pooler. fairseq's `RobertaClassificationHead` is
   dropout -> dense -> `--pooler-activation-fn` (tanh by default, required here) -> dropout -> out_proj,
   i.e. BERT's pooler + classifier. `--hf-bert-no-pooler-init` keeps fairseq's random dense.

Same parameter names as `roberta_base` plus `encoder.sentence_encoder.embed_segments.weight` and the
`pooler.*` buffers; convert with `--arch roberta_base` for a stock-fairseq checkpoint.
"""

import logging

import torch
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaModel, base_architecture
from torch import nn

from robustft_common.validation import require

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-12
DEFAULT_TYPE_VOCAB_SIZE = 2
# what a checkpoint must hold for hf_bert (older converters folded segment A into the positions and
# dropped the pooler: strict loading would only say "missing keys")
CONVERTED_KEYS = ("encoder.sentence_encoder.embed_segments.weight", "pooler.weight", "pooler.bias", "pooler.present")


class SegmentEmbedding(nn.Module):
    """BERT's token_type_embeddings, added to `embed_positions`' output by `add_to_positions` (a hook)."""

    def __init__(self, num_types: int, dim: int, separator_idx: int, padding_idx: int):
        super().__init__()
        # zeros, not BERT's N(0, 0.02): a converted checkpoint overwrites it anyway, and drawing nothing
        # keeps the random stream (hence the classification head's init) that of roberta with the same seed
        self.weight = nn.Parameter(torch.zeros(num_types, dim))
        self.separator_idx = separator_idx
        self.padding_idx = padding_idx

    def segment_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """0 up to and including the first separator, 1 after it (0 at padding, as BERT's tokenizers)."""
        if self.weight.size(0) < 2:
            return torch.zeros_like(tokens)
        is_sep = tokens.eq(self.separator_idx).long()
        after_first = (is_sep.cumsum(dim=1) - is_sep) > 0
        return (after_first & tokens.ne(self.padding_idx)).long()

    def add_to_positions(self, module, args, kwargs, positions):
        tokens = args[0] if args else kwargs["input"]  # LearnedPositionalEmbedding.forward(input, ...)
        return positions + nn.functional.embedding(self.segment_ids(tokens), self.weight).to(positions.dtype)


class PretrainedPooler(nn.Module):
    """BERT's pooler dense layer as buffers: the initial value of classification heads' dense layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(dim, dim))
        self.register_buffer("bias", torch.zeros(dim))
        self.register_buffer("present", torch.zeros((), dtype=torch.bool))  # False: source had no pooler


@register_model("hf_bert")
class HFBertModel(RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        parser.add_argument(
            "--hf-bert-layer-norm-eps",
            type=float,
            metavar="EPS",
            help=f"eps of every LayerNorm (BERT's layer_norm_eps; default {DEFAULT_EPS})",
        )
        parser.add_argument(
            "--hf-bert-type-vocab-size",
            type=int,
            metavar="N",
            help="rows of the token-type (segment) table (BERT's type_vocab_size; default "
            f"{DEFAULT_TYPE_VOCAB_SIZE}); tokens after the first </s> get type 1",
        )
        parser.add_argument(
            "--hf-bert-no-pooler-init",
            action="store_true",
            help="do not initialise new classification heads' dense layer from the "
            "checkpoint's BERT pooler (fairseq's random init instead)",
        )

    def __init__(self, args, encoder):
        super().__init__(args, encoder)
        eps = getattr(args, "hf_bert_layer_norm_eps", None)
        eps = DEFAULT_EPS if eps is None else eps
        require(eps > 0, "--hf-bert-layer-norm-eps", f"must be > 0, got {eps}")
        types = getattr(args, "hf_bert_type_vocab_size", None)
        types = DEFAULT_TYPE_VOCAB_SIZE if types is None else types
        require(types >= 1, "--hf-bert-type-vocab-size", f"must be >= 1 (BERT's type_vocab_size), got {types}")
        self.pooler_init = not getattr(args, "hf_bert_no_pooler_init", False)
        activation = getattr(args, "pooler_activation_fn", "tanh")
        require(
            not self.pooler_init or activation == "tanh",
            "--pooler-activation-fn",
            f"is {activation!r}, but the BERT pooler that initialises the head is dense + tanh; "
            "use tanh or add --hf-bert-no-pooler-init",
        )
        set_layer_norm_eps(self, eps)
        sentence_encoder = encoder.sentence_encoder
        dim = sentence_encoder.embed_tokens.embedding_dim
        sentence_encoder.embed_segments = SegmentEmbedding(
            types, dim, encoder.dictionary.eos(), encoder.dictionary.pad()
        )
        # a bound method of the submodule, so deepcopy (fairseq's EMA) rebinds it to the copy's table
        sentence_encoder.embed_positions.register_forward_hook(
            sentence_encoder.embed_segments.add_to_positions, with_kwargs=True
        )
        self.pooler = PretrainedPooler(args.encoder_embed_dim)  # the layers' width (hf_electra: wider than dim)

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        """fairseq's head; its dense starts as the pooler when one is loaded (hub use after loading).

        When fairseq-train builds the model the head is registered before the checkpoint is read
        (present is still False); `upgrade_state_dict_named` initialises it then.
        """
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        if self.pooler_init and bool(self.pooler.present):
            dense = self.classification_heads[name].dense
            state = dense.state_dict()
            if _put_pooler(state, "", self.pooler.weight, self.pooler.bias, name):
                dense.load_state_dict(state)

    def upgrade_state_dict_named(self, state_dict, name):
        """Heads the checkpoint lacks get the checkpoint's pooler as dense; saved heads are kept as saved.

        fairseq-train registers the task's head, then loads `--restore-file` / `--finetune-from-model`
        (trainer.load_checkpoint -> load_state_dict -> here), and RobertaModel's upgrade copies the
        fresh head into the state (fairseq/models/roberta/model.py:448-454). A resumed checkpoint holds
        the trained head, so it is not touched.
        """
        prefix = name + "." if name != "" else ""
        missing = [prefix + k for k in CONVERTED_KEYS if prefix + k not in state_dict]
        if missing:
            raise KeyError(
                f"this checkpoint has no {', '.join(missing)}, which --arch hf_bert needs (segment "
                "embeddings, BERT pooler). Re-convert the Hugging Face model with the current "
                "`python -m hf2fairseq` (older versions folded segment A into the positions and dropped the "
                "pooler), or load it with --arch roberta_base"
            )
        heads = prefix + "classification_heads."
        new_heads = [h for h in self.classification_heads if not any(k.startswith(f"{heads}{h}.") for k in state_dict)]
        super().upgrade_state_dict_named(state_dict, name)
        if self.pooler_init and bool(state_dict[prefix + "pooler.present"]):
            for head in new_heads:
                _put_pooler(
                    state_dict,
                    f"{heads}{head}.dense.",
                    state_dict[prefix + "pooler.weight"],
                    state_dict[prefix + "pooler.bias"],
                    head,
                )


def _put_pooler(state: dict, prefix: str, weight: torch.Tensor, bias: torch.Tensor, head: str) -> bool:
    """Write the pooler into a head's dense state (`weight`, or `weight_orig` under torch spectral_norm)."""
    key = prefix + ("weight_orig" if prefix + "weight_orig" in state else "weight")
    if state[key].shape != weight.shape:
        logger.warning(
            "classification head %s: dense is %s, the BERT pooler %s; keeping its random init",
            head,
            tuple(state[key].shape),
            tuple(weight.shape),
        )
        return False
    state[key] = weight.detach().clone().to(state[key])
    state[prefix + "bias"] = bias.detach().clone().to(state[prefix + "bias"])
    logger.info("classification head %s: dense initialised from the BERT pooler", head)
    return True


def set_layer_norm_eps(module: nn.Module, eps: float) -> int:
    """Set eps on every LayerNorm-like module (torch's and apex's fused); returns how many."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm) or type(sub).__name__ == "FusedLayerNorm":
            sub.eps = eps  # type: ignore[assignment]  # a float attribute; mypy sees nn.Module.__setattr__'s union
            count += 1
    return count


@register_model_architecture("hf_bert", "hf_bert")
def hf_bert_architecture(args):
    if getattr(args, "hf_bert_layer_norm_eps", None) is None:
        args.hf_bert_layer_norm_eps = DEFAULT_EPS
    if getattr(args, "hf_bert_type_vocab_size", None) is None:
        args.hf_bert_type_vocab_size = DEFAULT_TYPE_VOCAB_SIZE
    # stored in every checkpoint's cfg, so `from_pretrained(..., hf_bert_no_pooler_init=True)` can override it
    args.hf_bert_no_pooler_init = getattr(args, "hf_bert_no_pooler_init", False)
    base_architecture(args)
