"""The baselines of the Hyperdecoders table as architectures of `hyperdecoder_bart`.

- `hyperformer_bart_{large,base,tiny}`: encoder and decoder adapters generated from a learned task
  embedding (`--encoder-adapter task --decoder-adapter task`), the reference's `glue_task_task` /
  `summarise_nli_task` configs (allenai/hyperdecoders `configs/`; their table's "Hyperformer" row).
  Train with `--one-task-per-batch` (rabeehk/hyperformer's `MultiTaskBatchSampler`).
- `single_adapter_bart_{large,base,tiny}`: one manual adapter per layer in both stacks, its width chosen so
  the trainable count matches the Hyperdecoder's of the same size (the reference's `glue_manual_manual`,
  spec section 1: a 230 both stacks matched the effective T5-large count).
"""

from argparse import Namespace

from fairseq.models import register_model_architecture

from .adapters import AdapterHypernetwork
from .hyperdecoder_bart import hyperdecoder_bart_base, hyperdecoder_bart_large, hyperdecoder_bart_tiny

# adapter flags a baseline arch sets; the Hyperdecoder it is matched to uses its own defaults for them
_ADAPTER_FLAGS = ("encoder_adapter", "decoder_adapter", "encoder_adapter_dim", "decoder_adapter_dim")


def adapter_params(embed_dim: int, adapter_dim: int) -> int:
    """Parameters of one bottleneck adapter (down + up, with biases)."""
    return 2 * embed_dim * adapter_dim + adapter_dim + embed_dim


def hyperdecoder_trainable_params(args) -> int:
    """Trainable parameters of the default Hyperdecoder (manual encoder adapters, generated decoder adapters,
    MLP) with these (already arch-filled) dimensions. Closed forms, checked against the module in the tests."""
    c, a_enc, a_dec = args.encoder_embed_dim, args.encoder_adapter_dim, args.decoder_adapter_dim
    encoder = args.encoder_layers * adapter_params(c, a_enc)
    generator = AdapterHypernetwork.num_params(
        args.decoder_layers, c, args.decoder_embed_dim, a_dec, args.hypernetwork_bottleneck, args.layer_embed_dim
    )
    mlp = 0 if args.no_process_encoder_output else 2 * (c * c + c)
    return encoder + generator + mlp


def matched_single_adapter_dim(args, hyperdecoder_arch, hyperdecoder_dims: dict | None = None) -> int:
    """Width a of one adapter per layer in both stacks whose count is nearest the Hyperdecoder's (its arch's
    defaults, or `hyperdecoder_dims`: encoder_adapter_dim / decoder_adapter_dim / hypernetwork_bottleneck)."""
    kept = {k: v for k, v in vars(args).items() if k not in (*_ADAPTER_FLAGS, "hypernetwork_bottleneck")}
    reference = Namespace(**kept, **(hyperdecoder_dims or {}))
    hyperdecoder_arch(reference)
    require_same_width(reference)
    target = hyperdecoder_trainable_params(reference)
    layers, c = reference.encoder_layers + reference.decoder_layers, reference.encoder_embed_dim
    return max(1, round((target / layers - c) / (2 * c + 1)))


def require_same_width(args):
    if args.encoder_embed_dim != args.decoder_embed_dim:
        raise ValueError(
            "single_adapter_bart_*: the matched width assumes equal encoder and decoder widths, got "
            f"--encoder-embed-dim {args.encoder_embed_dim} and --decoder-embed-dim {args.decoder_embed_dim}; "
            "give --encoder-adapter-dim/--decoder-adapter-dim explicitly"
        )


def _single_adapter(args, hyperdecoder_arch):
    given = {k: getattr(args, k, None) for k in ("encoder_adapter_dim", "decoder_adapter_dim")}
    if None in given.values():
        width = matched_single_adapter_dim(args, hyperdecoder_arch)
        for key, value in given.items():
            if value is None:
                setattr(args, key, width)
    args.encoder_adapter = getattr(args, "encoder_adapter", None) or "manual"
    args.decoder_adapter = getattr(args, "decoder_adapter", None) or "manual"
    hyperdecoder_arch(args)


def _hyperformer(args, hyperdecoder_arch):
    args.encoder_adapter = getattr(args, "encoder_adapter", None) or "task"
    args.decoder_adapter = getattr(args, "decoder_adapter", None) or "task"
    hyperdecoder_arch(args)


@register_model_architecture("hyperdecoder_bart", "single_adapter_bart_large")
def single_adapter_bart_large(args):
    _single_adapter(args, hyperdecoder_bart_large)


@register_model_architecture("hyperdecoder_bart", "single_adapter_bart_base")
def single_adapter_bart_base(args):
    _single_adapter(args, hyperdecoder_bart_base)


@register_model_architecture("hyperdecoder_bart", "single_adapter_bart_tiny")
def single_adapter_bart_tiny(args):
    _single_adapter(args, hyperdecoder_bart_tiny)


@register_model_architecture("hyperdecoder_bart", "hyperformer_bart_large")
def hyperformer_bart_large(args):
    _hyperformer(args, hyperdecoder_bart_large)


@register_model_architecture("hyperdecoder_bart", "hyperformer_bart_base")
def hyperformer_bart_base(args):
    _hyperformer(args, hyperdecoder_bart_base)


@register_model_architecture("hyperdecoder_bart", "hyperformer_bart_tiny")
def hyperformer_bart_tiny(args):
    _hyperformer(args, hyperdecoder_bart_tiny)


def single_adapter_width(size: str, **hyperdecoder_dims: int) -> int:
    """The single-adapter width matched to a `hyperdecoder_bart_<size>` with these dimensions
    (encoder_adapter_dim, decoder_adapter_dim, hypernetwork_bottleneck); the recipes pass it explicitly."""
    archs = {"large": hyperdecoder_bart_large, "base": hyperdecoder_bart_base, "tiny": hyperdecoder_bart_tiny}
    return matched_single_adapter_dim(Namespace(), archs[size], hyperdecoder_dims)
