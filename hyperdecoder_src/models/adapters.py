"""Bottleneck adapters, the instance-conditioned adapter hypernetwork, and the FFN-parallel hook.

Shapes follow fairseq: activations are T x B x C; generated weights are per instance (leading B).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# (w_down [R, C, a], b_down [R, a], w_up [R, a, C], b_up [R, C]) for one layer, R rows.
AdapterWeights = tuple[Tensor, Tensor, Tensor, Tensor]

# Module-name fragments of every parameter this plugin adds to BART (warm start adds exactly these).
ADAPTER_KEY_FRAGMENTS = (".adapter.", "param_gen.", "mlp.", "adapter_task_embedding.")


def is_adapter_key(key: str) -> bool:
    return any(fragment in key for fragment in ADAPTER_KEY_FRAGMENTS)


class BottleneckAdapter(nn.Module):
    """A(u) = W_up ReLU(W_down u + b_down) + b_up, near-zero init so training starts at the backbone."""

    def __init__(self, embed_dim: int, adapter_dim: int):
        super().__init__()
        self.down = nn.Linear(embed_dim, adapter_dim)
        self.up = nn.Linear(adapter_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        # reference: Xavier-uniform with gain 1e-4, zero biases
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight, gain=1e-4)
            nn.init.zeros_(linear.bias)

    def forward(self, u: Tensor) -> Tensor:
        return self.up(F.relu(self.down(u)))


def apply_generated_adapter(u: Tensor, weights: AdapterWeights) -> Tensor:
    """Per-instance adapter on T x B x C input with weights whose leading dim is B."""
    w_down, b_down, w_up, b_up = weights
    hidden = F.relu(torch.einsum("tbc,bca->tba", u, w_down) + b_down.unsqueeze(0))
    return torch.einsum("tba,bac->tbc", hidden, w_up) + b_up.unsqueeze(0)


def masked_mean(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean of T x B x C `x` over the non-pad positions of each instance -> B x C."""
    if padding_mask is None:
        return x.mean(dim=0)
    keep = (~padding_mask).transpose(0, 1).unsqueeze(-1).type_as(x)  # T x B x 1
    return (x * keep).sum(dim=0) / keep.sum(dim=0).clamp(min=1.0)


class InstanceEncoderMLP(nn.Sequential):
    """Linear(C, C) -> ReLU -> Linear(C, C) on the pooled encoder output (PyTorch default init)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def reset_parameters(self):
        for module in self:
            if isinstance(module, nn.Linear):
                module.reset_parameters()


class AdapterTaskEmbedding(nn.Embedding):
    """One learned vector per task, the generator's input in `task` mode (Hyperformer; reference AT L127-135).
    Its own class so the model can restore PyTorch's N(0, 1) init after BART's `init_bert_params`."""


class AdapterHypernetwork(nn.Module):
    """One generator shared by all layers of a stack: [e_i; E_l] -> ReLU(linear1) -> four heads.

    Vectorised over layers (the reference loops in Python); returns, for every instance and layer,
    the down/up weights and biases of a bottleneck adapter of width `adapter_dim`.
    """

    def __init__(
        self, num_layers: int, input_dim: int, embed_dim: int, adapter_dim: int, bottleneck: int, layer_embed_dim: int
    ):
        super().__init__()
        self.num_layers, self.embed_dim, self.adapter_dim = num_layers, embed_dim, adapter_dim
        self.layer_embed = nn.Embedding(num_layers, layer_embed_dim)
        self.linear1 = nn.Linear(input_dim + layer_embed_dim, bottleneck)
        self.weight_down = nn.Linear(bottleneck, embed_dim * adapter_dim)
        self.bias_down = nn.Linear(bottleneck, adapter_dim)
        self.weight_up = nn.Linear(bottleneck, adapter_dim * embed_dim)
        self.bias_up = nn.Linear(bottleneck, embed_dim)
        self.reset_parameters()

    @staticmethod
    def num_params(num_layers, input_dim, embed_dim, adapter_dim, bottleneck, layer_embed_dim) -> int:
        """Closed form of the parameter count (checked against the module in the tests)."""
        heads_out = 2 * embed_dim * adapter_dim + adapter_dim + embed_dim
        return (
            num_layers * layer_embed_dim + (input_dim + layer_embed_dim + 1) * bottleneck + (bottleneck + 1) * heads_out
        )

    def reset_parameters(self):
        self.layer_embed.reset_parameters()
        self.linear1.reset_parameters()
        hb = self.linear1.out_features
        # hyperfanin init (reference AG L7-16): generated weights start ~1e-3 of a fan-in init
        for head, fan_in in ((self.weight_down, self.embed_dim), (self.weight_up, self.adapter_dim)):
            bound = 1e-3 * math.sqrt(3.0 / (hb * fan_in))
            nn.init.uniform_(head.weight, -bound, bound)
            nn.init.zeros_(head.bias)
        for head in (self.bias_down, self.bias_up):
            bound = 1e-3 * math.sqrt(3.0 / hb)
            nn.init.uniform_(head.weight, -bound, bound)
            nn.init.zeros_(head.bias)

    def forward(self, instance_embedding: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """instance_embedding B x D -> (w_down B x L x C x a, b_down B x L x a, w_up B x L x a x C, b_up B x L x C)."""
        bsz = instance_embedding.size(0)
        layers = self.layer_embed.weight.unsqueeze(0).expand(bsz, -1, -1)
        inst = instance_embedding.unsqueeze(1).expand(-1, self.num_layers, -1)
        z = F.relu(self.linear1(torch.cat([inst, layers.to(inst.dtype)], dim=-1)))  # B x L x hb
        c, a = self.embed_dim, self.adapter_dim
        return (
            self.weight_down(z).view(bsz, self.num_layers, c, a),
            self.bias_down(z),
            self.weight_up(z).view(bsz, self.num_layers, a, c),
            self.bias_up(z),
        )


def task_conditioned_weights(embedding: nn.Embedding, generator: AdapterHypernetwork, task_ids: Tensor):
    """Adapter weights once per distinct task of the batch, and the row -> weight-row map (for the slot)."""
    tasks, rows = torch.unique(task_ids, return_inverse=True)
    return generator(embedding(tasks)), rows


class GeneratedAdapterSlot:
    """Plain holder (not a module) through which a stack hands generated weights to its layers.

    `rows` maps each row of the current batch to the instance whose weights it uses (beam search
    expands and reorders rows; the weights themselves are kept once per source).
    """

    def __init__(self):
        self.weights: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.rows: Tensor | None = None

    def set(self, weights, rows: Tensor | None = None):
        self.weights, self.rows = weights, rows

    def clear(self):
        self.weights, self.rows = None, None

    def for_layer(self, layer_idx: int) -> AdapterWeights | None:
        if self.weights is None:
            return None
        w_down, b_down, w_up, b_up = (w[:, layer_idx] for w in self.weights)
        if self.rows is not None:
            rows = self.rows
            w_down, b_down, w_up, b_up = (w.index_select(0, rows) for w in (w_down, b_down, w_up, b_up))
        return w_down, b_down, w_up, b_up


class ParallelAdapterMixin:
    """Adds an adapter in parallel with a fairseq transformer layer's FFN sub-block.

    fairseq's layer computes `residual_connection(dropout(fc2(act(fc1(h)))), h)` for the FFN; a
    forward pre-hook on fc1 marks that the next `residual_connection` is the FFN one, which then
    adds A(h) (A(fc1 input) with --adapter-norm-input). Nothing of fairseq's forward is copied.
    """

    # Provided by the fairseq transformer layer this is mixed into (TransformerEncoder/DecoderLayerBase).
    embed_dim: int
    fc1: nn.Module

    def init_parallel_adapter(
        self, adapter_dim: int, manual: bool, slot: GeneratedAdapterSlot | None, layer_idx: int, norm_input: bool
    ):
        self.adapter = BottleneckAdapter(self.embed_dim, adapter_dim) if manual else None
        self.generated_adapter_slot = slot
        self.layer_idx = layer_idx
        self.adapter_norm_input = norm_input
        self._ffn_input: Tensor | None = None
        if manual or slot is not None:
            self.fc1.register_forward_pre_hook(self._remember_ffn_input)

    def _remember_ffn_input(self, module, args):
        self._ffn_input = args[0]

    def residual_connection(self, x, residual):
        out = super().residual_connection(x, residual)
        ffn_input, self._ffn_input = self._ffn_input, None
        if ffn_input is None:  # attention sub-block
            return out
        u = ffn_input if self.adapter_norm_input else residual
        generated = self.generated_adapter_slot.for_layer(self.layer_idx) if self.generated_adapter_slot else None
        if generated is not None:
            return out + apply_generated_adapter(u, generated)
        if self.adapter is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.layer_idx}: generated adapter weights were not set; "
                "the stack must generate them before running its layers"
            )
        return out + self.adapter(u)
