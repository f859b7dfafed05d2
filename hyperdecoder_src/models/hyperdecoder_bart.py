"""`hyperdecoder_bart`: BART with FFN-parallel adapters whose decoder weights a hypernetwork generates
per source instance (Ivison & Peters 2022), warm-startable from plain fairseq BART checkpoints.

`task` adapters (the Hyperformer baseline) generate the weights from a learned task embedding instead; the
task of every example reaches the model as `net_input["adapter_task_ids"]` (the multi-task text-to-text
tasks of this plugin add it)."""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.bart.model import BARTModel, bart_base_architecture, bart_large_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor

from robustft_common.validation import require, require_choice

from .adapters import (
    AdapterHypernetwork,
    AdapterTaskEmbedding,
    BottleneckAdapter,
    GeneratedAdapterSlot,
    InstanceEncoderMLP,
    ParallelAdapterMixin,
    is_adapter_key,
    masked_mean,
    task_conditioned_weights,
)

logger = logging.getLogger(__name__)

ADAPTER_CHOICES = ChoiceEnum(["none", "manual", "generated", "task"])
POOLED_KEY = "hyper_pooled"  # extra encoder_out key: masked-mean final encoder output, B x C
TASK_IDS_KEY = "adapter_task_ids"  # net_input and extra encoder_out key (task adapters): B task indices


@dataclass
class HyperdecoderModelConfig(FairseqDataclass):
    """Flags added to BART's (names follow the reference config; none collides with a fairseq flag)."""

    encoder_adapter: ADAPTER_CHOICES = field(
        default="manual",
        metadata={
            "help": "encoder adapters: none | manual (one per layer) | "
            "generated (2 encoder passes: manual, then instance-generated) | "
            "task (generated from a learned task embedding: Hyperformer)"
        },
    )
    decoder_adapter: ADAPTER_CHOICES = field(
        default="generated",
        metadata={
            "help": "decoder adapters: none | manual | generated from the pooled encoder output (Hyperdecoder) | "
            "task (generated from a learned task embedding: Hyperformer)"
        },
    )
    encoder_adapter_dim: int = field(default=64, metadata={"help": "encoder adapter bottleneck width"})
    decoder_adapter_dim: int = field(default=64, metadata={"help": "decoder adapter bottleneck width"})
    hypernetwork_bottleneck: int = field(default=128, metadata={"help": "hidden size of the adapter generator"})
    layer_embed_dim: int = field(default=10, metadata={"help": "size of the generator's layer-id embedding"})
    no_process_encoder_output: bool = field(
        default=False,
        metadata={"help": "feed the pooled encoder output to the generator directly (no Linear-ReLU-Linear MLP)"},
    )
    adapter_norm_input: bool = field(
        default=False,
        metadata={
            "help": "adapters read the FFN input (after its layer norm in pre-LN "
            "models) instead of the un-normalised residual"
        },
    )
    adapter_tasks: str = field(
        default="",
        metadata={
            "help": "task adapters: the task names, comma-separated, in embedding order; empty = the data's "
            "tasks (the multi-task text-to-text tasks' tasks.json), recorded in the checkpoint"
        },
    )
    no_freeze_backbone: bool = field(default=False, metadata={"help": "train every parameter"})
    unfreeze_encoder: bool = field(
        default=False, metadata={"help": "also train the whole encoder (incl. the shared embeddings)"}
    )
    unfreeze_decoder: bool = field(
        default=False, metadata={"help": "also train the whole decoder (incl. the shared embeddings)"}
    )


def hyperdecoder_defaults(args):
    for name, value in HyperdecoderModelConfig().__dict__.items():
        if not hasattr(args, name) or getattr(args, name) is None:
            setattr(args, name, value)


def adapter_task_names(args) -> List[str]:
    return [t for t in str(getattr(args, "adapter_tasks", "") or "").split(",") if t]


def uses_task_adapters(args) -> bool:
    return "task" in (str(args.encoder_adapter), str(args.decoder_adapter))


def validate_hyperdecoder_args(args):
    require_choice("--encoder-adapter", args.encoder_adapter, ADAPTER_CHOICES)
    require_choice("--decoder-adapter", args.decoder_adapter, ADAPTER_CHOICES)
    for flag, value in (
        ("--encoder-adapter-dim", args.encoder_adapter_dim),
        ("--decoder-adapter-dim", args.decoder_adapter_dim),
        ("--hypernetwork-bottleneck", args.hypernetwork_bottleneck),
        ("--layer-embed-dim", args.layer_embed_dim),
    ):
        require(isinstance(value, int) and value > 0, flag, f"must be a positive integer, got {value!r}")
    require(
        str(args.encoder_adapter) != "none"
        or str(args.decoder_adapter) != "none"
        or getattr(args, "no_freeze_backbone", False)
        or getattr(args, "unfreeze_encoder", False)
        or getattr(args, "unfreeze_decoder", False),
        "--encoder-adapter/--decoder-adapter",
        "both none with a frozen backbone leaves nothing to train; add an adapter, "
        "--no-freeze-backbone, or --unfreeze-encoder/--unfreeze-decoder",
    )
    generated = bool({"generated", "task"} & {str(args.encoder_adapter), str(args.decoder_adapter)})
    require(
        not (generated and getattr(args, "checkpoint_activations", False)),
        "--checkpoint-activations",
        "is not supported with generated adapters (the recomputed layer would not see the generated "
        "weights); drop --checkpoint-activations or use --encoder/--decoder-adapter manual",
    )
    require(
        not (
            generated and getattr(args, "encoder_layerdrop", 0) or generated and getattr(args, "decoder_layerdrop", 0)
        ),
        "--encoder-layerdrop/--decoder-layerdrop",
        "must be 0 with generated adapters",
    )


def require_task_ids(task_ids: Optional[Tensor], batch_size: int) -> Tensor:
    if task_ids is None:
        raise RuntimeError(
            "--encoder-adapter/--decoder-adapter task: this batch has no task ids (net_input['adapter_task_ids']); "
            "train and evaluate with --task hyperdecoder_glue, hyperdecoder_mrqa or hyperdecoder_text2text, which "
            "add them from <split>.task"
        )
    if task_ids.dim() != 1 or task_ids.numel() != batch_size:
        raise RuntimeError(
            f"adapter_task_ids must hold one task index per source row ({batch_size}), got shape "
            f"{tuple(task_ids.shape)}"
        )
    return task_ids


def _wrap_layer(layer, cfg):
    # fairseq's own wrapping minus activation checkpointing (rejected above for generated adapters)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap)


class HyperdecoderEncoderLayer(ParallelAdapterMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, layer_idx: int, slot: Optional[GeneratedAdapterSlot], return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        mode = str(cfg.encoder_adapter)
        # `generated` keeps the manual adapter: it runs in the first of the two encoder passes
        self.init_parallel_adapter(
            cfg.encoder_adapter_dim,
            manual=mode in ("manual", "generated"),
            slot=slot,
            layer_idx=layer_idx,
            norm_input=cfg.adapter_norm_input,
        )


class HyperdecoderDecoderLayer(ParallelAdapterMixin, TransformerDecoderLayerBase):
    def __init__(self, cfg, layer_idx: int, slot: Optional[GeneratedAdapterSlot], no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        mode = str(cfg.decoder_adapter)
        self.init_parallel_adapter(
            cfg.decoder_adapter_dim,
            manual=mode == "manual",
            slot=slot,
            layer_idx=layer_idx,
            norm_input=cfg.adapter_norm_input,
        )


class HyperdecoderEncoder(TransformerEncoderBase):
    """BART encoder + adapters; adds the pooled final output (generated decoder adapters) or the task ids
    (task decoder adapters) to `encoder_out` for the decoder."""

    def __init__(self, cfg, dictionary, embed_tokens):
        self.mode = str(cfg.encoder_adapter)
        self.generated = self.mode in ("generated", "task")
        self.adapter_slot = GeneratedAdapterSlot() if self.generated else None
        self._layers_built = 0
        super().__init__(cfg, dictionary, embed_tokens)
        self.pool_for_decoder = str(cfg.decoder_adapter) == "generated"
        self.task_ids_for_decoder = str(cfg.decoder_adapter) == "task"
        # set by HyperdecoderBARTModel.forward around BART's forward, which passes the encoder no extra inputs
        self.pending_task_ids: Optional[Tensor] = None
        dim = embed_tokens.embedding_dim
        if self.mode == "generated":
            self.mlp = None if cfg.no_process_encoder_output else InstanceEncoderMLP(dim)
        if self.mode == "task":
            self.adapter_task_embedding = AdapterTaskEmbedding(len(adapter_task_names(cfg)), dim)
        if self.generated:
            self.param_gen = AdapterHypernetwork(
                cfg.encoder.layers, dim, dim, cfg.encoder_adapter_dim, cfg.hypernetwork_bottleneck, cfg.layer_embed_dim
            )

    def build_encoder_layer(self, cfg):
        layer = HyperdecoderEncoderLayer(cfg, self._layers_built, self.adapter_slot, return_fc=self.return_fc)
        self._layers_built += 1
        return _wrap_layer(layer, cfg)

    def forward(
        self,
        src_tokens,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        adapter_task_ids: Optional[Tensor] = None,
    ):
        # the sequence generator calls this with every net_input key (fairseq_encoder.py L57-62)
        if adapter_task_ids is None:
            adapter_task_ids = self.pending_task_ids
        return self.forward_scriptable(src_tokens, src_lengths, return_all_hiddens, token_embeddings, adapter_task_ids)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        adapter_task_ids: Optional[Tensor] = None,
    ):
        if self.task_ids_for_decoder or self.mode == "task":
            adapter_task_ids = require_task_ids(adapter_task_ids, src_tokens.size(0))
        if self.mode == "generated":
            # reference semantics: pass 1 with the manual adapters (not detached) conditions pass 2
            first = super().forward_scriptable(src_tokens, src_lengths, False, token_embeddings)
            pooled = masked_mean(first["encoder_out"][0], first["encoder_padding_mask"][0])
            if self.mlp is not None:
                pooled = self.mlp(pooled)
            self.adapter_slot.set(self.param_gen(pooled))
        elif self.mode == "task":
            task_ids = require_task_ids(adapter_task_ids, src_tokens.size(0))
            self.adapter_slot.set(*task_conditioned_weights(self.adapter_task_embedding, self.param_gen, task_ids))
        try:
            out = super().forward_scriptable(src_tokens, src_lengths, return_all_hiddens, token_embeddings)
        finally:
            if self.adapter_slot is not None:
                self.adapter_slot.clear()
        if self.pool_for_decoder:
            out[POOLED_KEY] = [masked_mean(out["encoder_out"][0], out["encoder_padding_mask"][0])]
        if self.task_ids_for_decoder:
            out[TASK_IDS_KEY] = [adapter_task_ids]
        return out

    @torch.jit.export
    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        # the parent rebuilds a fixed-key dict and would drop the pooled vector
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        for key in (POOLED_KEY, TASK_IDS_KEY):
            if key in encoder_out:
                reordered[key] = [t.index_select(0, new_order) for t in encoder_out[key]]
        return reordered


class HyperdecoderDecoder(TransformerDecoderBase):
    """BART decoder whose layers' adapters are generated once per source instance.

    Under incremental decoding the weights are generated at the first step and cached in the
    incremental state together with a row -> instance map; `reorder_incremental_state` follows beam
    expansion/reordering/finished-sentence removal through that map. This also covers BART's
    `set_beam_size`, which leaves `encoder_out` at the un-expanded batch size.
    """

    CACHE_KEY = "hyperdecoder_adapters"

    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        self.mode = str(cfg.decoder_adapter)
        self.generated = self.mode in ("generated", "task")
        self.adapter_slot = GeneratedAdapterSlot() if self.generated else None
        self._layers_built = 0
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        if self.generated:
            enc_dim, dim = cfg.encoder.embed_dim, cfg.decoder.embed_dim
            if self.mode == "generated":
                self.mlp = None if cfg.no_process_encoder_output else InstanceEncoderMLP(enc_dim)
            else:  # reference AT L127-135: the task embedding has the stack's width and feeds the generator directly
                self.adapter_task_embedding = AdapterTaskEmbedding(len(adapter_task_names(cfg)), dim)
            self.param_gen = AdapterHypernetwork(
                cfg.decoder.layers,
                enc_dim if self.mode == "generated" else dim,
                dim,
                cfg.decoder_adapter_dim,
                cfg.hypernetwork_bottleneck,
                cfg.layer_embed_dim,
            )

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        layer = HyperdecoderDecoderLayer(cfg, self._layers_built, self.adapter_slot, no_encoder_attn)
        self._layers_built += 1
        return _wrap_layer(layer, cfg)

    def generate_adapter_weights(self, encoder_out):
        """Per-instance decoder adapter weights from encoder_out's pooled vector (one row per source)."""
        if encoder_out is None or POOLED_KEY not in encoder_out:
            raise RuntimeError(
                f"--decoder-adapter generated needs encoder_out['{POOLED_KEY}'], produced by "
                "HyperdecoderEncoder; this encoder_out came from another encoder"
            )
        pooled = encoder_out[POOLED_KEY][0]
        if self.mlp is not None:
            pooled = self.mlp(pooled)
        return self.param_gen(pooled)

    def _conditioned_weights(self, encoder_out):
        """(weights, row -> weight-row map or None for one row each, number of source instances)."""
        if self.mode == "task":
            if encoder_out is None or TASK_IDS_KEY not in encoder_out:
                raise RuntimeError(
                    f"--decoder-adapter task needs encoder_out['{TASK_IDS_KEY}'], produced by HyperdecoderEncoder "
                    "from net_input['adapter_task_ids']"
                )
            task_ids = encoder_out[TASK_IDS_KEY][0]
            weights, rows = task_conditioned_weights(self.adapter_task_embedding, self.param_gen, task_ids)
            return weights, rows, task_ids.size(0)
        weights = self.generate_adapter_weights(encoder_out)
        return weights, None, weights[0].size(0)

    def _adapter_weights(self, num_rows: int, encoder_out, incremental_state):
        cached = self.get_incremental_state(incremental_state, self.CACHE_KEY)
        if cached is not None:
            weights = (cached["w_down"], cached["b_down"], cached["w_up"], cached["b_up"])
            return weights, cached["rows"]
        weights, rows, instances = self._conditioned_weights(encoder_out)
        if num_rows != instances:
            # rows are instances expanded beam-wise in order (first step of beam search under BART's
            # set_beam_size, which skips reorder_encoder_out); later steps follow the cached map
            if num_rows % instances != 0:
                raise RuntimeError(f"cannot map {num_rows} decoder rows onto {instances} source instances")
            expand = torch.arange(instances, device=weights[0].device).repeat_interleave(num_rows // instances)
            rows = expand if rows is None else rows.index_select(0, expand)
        if incremental_state is not None:
            if rows is None:
                rows = torch.arange(instances, device=weights[0].device)
            w_down, b_down, w_up, b_up = weights
            self.set_incremental_state(
                incremental_state,
                self.CACHE_KEY,
                {"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "rows": rows},
            )
        return weights, rows

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer=None,
        alignment_heads=None,
    ):
        if not self.generated:
            return super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )
        weights, rows = self._adapter_weights(prev_output_tokens.size(0), encoder_out, incremental_state)
        self.adapter_slot.set(weights, rows)
        try:
            return super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )
        finally:
            self.adapter_slot.clear()

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        cached = self.get_incremental_state(incremental_state, self.CACHE_KEY)
        if cached is not None:
            cached["rows"] = cached["rows"].index_select(0, new_order)
            self.set_incremental_state(incremental_state, self.CACHE_KEY, cached)


@register_model("hyperdecoder_bart")
class HyperdecoderBARTModel(BARTModel):
    """BART + manual encoder adapters + instance-generated decoder adapters (by default)."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)  # applies init_bert_params to every module ...
        for module in self.modules():  # ... so restore the adapters' own initialisation
            if isinstance(module, (BottleneckAdapter, AdapterHypernetwork, InstanceEncoderMLP, AdapterTaskEmbedding)):
                module.reset_parameters()
        # task adapters: the task names in embedding order; the data's tasks map onto them (None otherwise)
        self.adapter_task_names: Optional[List[str]] = adapter_task_names(args) if uses_task_adapters(args) else None

    def forward(self, src_tokens, src_lengths, prev_output_tokens, adapter_task_ids: Optional[Tensor] = None, **kwargs):
        # BART's forward hands the encoder no extra inputs: park the task ids on it for this call
        self.encoder.pending_task_ids = adapter_task_ids
        try:
            return super().forward(src_tokens, src_lengths, prev_output_tokens, **kwargs)
        finally:
            self.encoder.pending_task_ids = None

    @staticmethod
    def add_args(parser):
        BARTModel.add_args(parser)
        gen_parser_from_dataclass(parser, HyperdecoderModelConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        hyperdecoder_defaults(args)
        validate_hyperdecoder_args(args)
        if uses_task_adapters(args) and not adapter_task_names(args):
            names = list(getattr(task, "adapter_task_names", lambda: [])())
            require(
                bool(names),
                "--adapter-tasks",
                "task adapters need the task names: give --adapter-tasks a,b,c or use a task whose data "
                "lists them (--task hyperdecoder_glue / hyperdecoder_mrqa / hyperdecoder_text2text with tasks.json)",
            )
            args.adapter_tasks = ",".join(names)  # saved with the checkpoint's config: the embedding order
        model = super().build_model(args, task)
        model.apply_freezing(args)
        model.log_parameter_counts()
        return model

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return HyperdecoderEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return HyperdecoderDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def apply_freezing(self, args):
        """Backbone frozen by default; adapters, MLPs and generators trainable."""
        if args.no_freeze_backbone:
            return
        for name, param in self.named_parameters():
            param.requires_grad = (
                is_adapter_key("." + name)
                or (args.unfreeze_encoder and name.startswith("encoder."))
                or (args.unfreeze_decoder and name.startswith("decoder."))
            )

    def parameter_counts(self) -> Dict[str, int]:
        counts = {
            "total": 0,
            "trainable": 0,
            "encoder_adapters": 0,
            "encoder_generator": 0,
            "decoder_adapters": 0,
            "decoder_generator": 0,
        }
        for name, param in self.named_parameters():
            n = param.numel()
            counts["total"] += n
            counts["trainable"] += n if param.requires_grad else 0
            stack = name.split(".")[0]
            if stack in ("encoder", "decoder") and ".adapter." in name:
                counts[f"{stack}_adapters"] += n
            elif stack in ("encoder", "decoder") and is_adapter_key("." + name):
                counts[f"{stack}_generator"] += n  # param_gen + mlp (+ the task embedding of task adapters)
        return counts

    def log_parameter_counts(self):
        c = self.parameter_counts()
        logger.info(
            "hyperdecoder: trainable %d / total %d parameters (%.2f%%); encoder adapters %d, encoder "
            "generator+mlp %d, decoder adapters %d, decoder generator+mlp %d",
            c["trainable"],
            c["total"],
            100.0 * c["trainable"] / max(c["total"], 1),
            c["encoder_adapters"],
            c["encoder_generator"],
            c["decoder_adapters"],
            c["decoder_generator"],
        )

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        # warm start from a plain BART checkpoint: add only our new keys, at their fresh init;
        # every other key stays subject to fairseq's strict loading
        prefix = name + "." if name else ""
        added = 0
        for key, value in self.state_dict().items():
            if is_adapter_key("." + key) and prefix + key not in state_dict:
                state_dict[prefix + key] = value
                added += 1
        if added:
            logger.info(
                "hyperdecoder: %d adapter/generator tensors absent from the checkpoint, freshly initialised", added
            )


def _hyperdecoder_arch(args, base_arch):
    hyperdecoder_defaults(args)
    base_arch(args)


@register_model_architecture("hyperdecoder_bart", "hyperdecoder_bart_large")
def hyperdecoder_bart_large(args):
    _hyperdecoder_arch(args, bart_large_architecture)


@register_model_architecture("hyperdecoder_bart", "hyperdecoder_bart_base")
def hyperdecoder_bart_base(args):
    _hyperdecoder_arch(args, bart_base_architecture)


@register_model_architecture("hyperdecoder_bart", "hyperdecoder_bart_tiny")
def hyperdecoder_bart_tiny(args):
    """2+2 layers, dim 64: for tests (matches `bart_base` with the same overrides, for warm starts)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    args.max_source_positions = getattr(args, "max_source_positions", 128)
    args.max_target_positions = getattr(args, "max_target_positions", 128)
    args.encoder_adapter_dim = getattr(args, "encoder_adapter_dim", 8)
    args.decoder_adapter_dim = getattr(args, "decoder_adapter_dim", 8)
    args.hypernetwork_bottleneck = getattr(args, "hypernetwork_bottleneck", 16)
    _hyperdecoder_arch(args, bart_base_architecture)
