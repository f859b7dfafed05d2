"""ChildTuning-F and ChildTuning-D (Xu et al., EMNLP 2021) as fairseq optimizers.

ChildTuning updates a "child network" only: the gradient is masked right before the optimizer step, after
fairseq's all-reduce, grad multiply and clipping (fairseq/trainer.py:905-951), the order of the reference,
where the HF trainer clips and `ChildTuningAdamW.step` then masks (AliceMind ChildTuning/ChildTuningOptimizer.py
L55-64, baselines.md §2.1, §2.3 trap 3):
- F (task-free): grad *= Bernoulli(p_F) / p_F, drawn afresh for every entry at every update, on every
  parameter with a gradient (the reference masks embeddings, LayerNorm, biases and the head too);
- D (task-driven): grad *= M, M fixed for the whole run: the top p_D fraction of the encoder layers' entries
  by Fisher information (mean over one shuffled pass of the training set of the squared, per-tensor clipped
  gradient of the batch-mean task loss; one global percentile over all selected entries, kept where
  F >= the (1 - p_D) percentile; no rescaling), ChildTuningD.py L50-106.

Each registered optimizer is a fairseq optimizer plus the mask, with that optimizer's own flags and the
`--childtuning-*` flags: `adam_childtuning` (fairseq `adam`), `adamax_childtuning` (fairseq `adamax`) and
`adamax_sage_childtuning` (`adamax_sage`; SAGE's sensitivity then sees the masked gradient, so D's frozen
entries get no SAGE step either). PATS is left out: its noise grows as the sensitivity |theta * g| shrinks,
so every masked entry would get the largest noise (baselines.md §8).

The D mask is computed once, at the first optimizer step of a run that has none (the model is fully loaded
then: `--restore-file` weights or a resumed checkpoint), by a Fisher pass over the training data through the
Trainer that built the optimizer (`fairseq_patches.building_trainer`); it is stored in the optimizer state, so
a resumed run (fairseq restores the optimizer state) never recomputes it. The Fisher pass uses
`torch.autograd.grad` (the step's own gradients stay untouched), forks the RNG (training draws the same
dropout masks with or without it) and all-reduces the Fisher sums, so all ranks select one mask.
F's masks come from a generator seeded from (--seed, the optimizer's update count), identical on all ranks
and after a resume; the count is part of the optimizer state.
"""

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from fairseq.optim.adamax import FairseqAdamax
from omegaconf import II

from pats_src.optim import AdamaxConfig, AdamaxSageConfig, FairseqAdamaxSage
from pats_src.sensitivity_adamax import update_seed
from robustft_common import fairseq_patches, param_filters
from robustft_common.sentence_prediction import RobustSentencePredictionCriterion
from robustft_common.validation import require, require_choice, require_finite_nonnegative

logger = logging.getLogger(__name__)

CHILDTUNING_MODES = ("F", "D")
STATE_KEY = "childtuning"  # the optimizer state_dict entry (D mask, update count, Fisher summary)
# F draws 16-bit uniforms: Bernoulli(p) is realised as lane < round(p * 2^16), i.e. p up to 2^-17
MASK_RESOLUTION = 1 << 16
MASK_CHUNK = 1 << 20  # entries masked per step of F's loop (bounded, cache-sized buffers)
_F_STREAM = 7  # `update_seed` stream of the F masks (PATS uses 0 and 1 on its own generator)


@dataclass
class ChildTuningConfig(FairseqDataclass):
    childtuning_mode: ChoiceEnum(list(CHILDTUNING_MODES)) = field(  # type: ignore[valid-type]
        default="D",
        metadata={
            "help": "F: Bernoulli(p) gradient mask, fresh every update, scaled by 1/p; D: fixed mask of the "
            "top-p Fisher-information entries of the encoder layers, chosen before the first update"
        },
    )
    childtuning_reserve_p: float = field(
        default=0.3,
        metadata={
            "help": "p_F / p_D: share of the entries that get their gradient (reference run.sh RTE: 0.3; "
            "author's per-task values in baselines.md §2.4)"
        },
    )
    childtuning_param_include: Optional[str] = field(
        default=None,
        metadata={
            "help": "regex (re.search on parameter names) of the masked tensors; default F: every tensor, "
            "D: the encoder layers (the reference's 'layer' in name)"
        },
    )
    childtuning_param_exclude: str = field(
        default=param_filters.NOTHING, metadata={"help": "regex of tensors left unmasked ('' = none)"}
    )
    childtuning_fisher_clip: float = field(
        default=1.0,
        metadata={
            "help": "D: clip each tensor's gradient to this norm before squaring it (the reference clips "
            "per tensor with the HF max_grad_norm, 1.0); 0 = no clipping"
        },
    )
    seed: int = II("common.seed")


# ------------------------------------------------------------------------------------------ pure parts
def bernoulli_scale_(flat: torch.Tensor, p: float, generator: torch.Generator, scale: float) -> torch.Tensor:
    """flat *= Bernoulli(p) * scale, in place on a 1-d tensor, chunk by chunk. The Bernoulli draws are 16-bit
    uniforms, four from one int64 word (a float uniform per entry costs ~3x more on CPU), compared into a
    float 0/1 buffer of the tensor's dtype (multiplying by a bool mask takes a slow type-promotion path)."""
    threshold = round(p * MASK_RESOLUTION) - MASK_RESOLUTION // 2  # int16 lanes are uniform on [-2^15, 2^15)
    size = min(MASK_CHUNK, flat.numel())
    words = torch.empty((size + 3) // 4, dtype=torch.int64, device=flat.device)
    keep = torch.empty(size, dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.numel(), MASK_CHUNK):
        part = flat[start : start + MASK_CHUNK]
        n = part.numel()
        lanes = words[: (n + 3) // 4].random_(-(2**63), 2**63 - 1, generator=generator).view(torch.int16)
        part.mul_(torch.lt(lanes[:n], threshold, out=keep[:n])).mul_(scale)
    return flat


def percentile(values: torch.Tensor, q: float) -> float:
    """numpy.percentile(values, q) with its default linear interpolation (the reference's threshold),
    via kthvalue (torch.quantile refuses large inputs; the reference's np.append copies quadratically)."""
    flat = values.reshape(-1)
    pos = (flat.numel() - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    v_hi = float(torch.kthvalue(flat, hi + 1).values) if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def clip_tensor_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ on one tensor (coefficient max_norm / (norm + 1e-6), at most 1)."""
    if max_norm > 0:
        coef = max_norm / (float(grad.norm()) + 1e-6)
        if coef < 1.0:
            grad.mul_(coef)
    return grad


def select_child(fisher: Sequence[torch.Tensor], reserve_p: float) -> tuple[List[torch.Tensor], float]:
    """Masks F >= the global (1 - p) percentile of all entries, and that threshold (ChildTuningD.py L92-102)."""
    polar = percentile(torch.cat([f.reshape(-1) for f in fisher]), (1.0 - reserve_p) * 100.0)
    return [f >= polar for f in fisher], polar


def fisher_loss(criterion, model, sample) -> torch.Tensor:
    """The batch-mean task loss on gold labels (the reference's outputs["loss"]): for the plugin's
    sentence-prediction criterions the plain loss without their extra terms (R3F, SMART), else the criterion's
    loss over its sample size."""
    if isinstance(criterion, RobustSentencePredictionCriterion):
        logits = criterion.classification_logits(model, sample)
        targets = model.get_targets(sample, [logits]).view(-1)
        return criterion.task_loss(logits, targets) / targets.numel()
    loss, sample_size, _ = criterion(model, sample)
    return loss / max(float(sample_size), 1.0)


# ------------------------------------------------------------------------------------------ Fisher pass
def fisher_batches(trainer):
    """One shuffled pass over this rank's shard of the training set, batched like training
    (the arguments of Trainer.get_train_iterator, fairseq/trainer.py:712-735), on its own iterator."""
    cfg, task = trainer.cfg, trainer.task
    itr = task.get_batch_iterator(
        dataset=task.dataset(cfg.dataset.train_subset),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(
            task.max_positions(), trainer.model.max_positions(), cfg.dataset.max_tokens
        ),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=trainer.data_parallel_world_size,
        shard_id=trainer.data_parallel_rank,
        num_workers=0,
        epoch=1,
        disable_iterator_cache=True,
    )
    for sample in itr.next_epoch_itr(shuffle=True):
        sample, is_dummy = trainer._prepare_sample(sample)
        if not is_dummy:  # an empty shard slot (fewer batches on this rank)
            yield sample


def fisher_information(trainer, names: Sequence[str], clip: float, seed: int, batches=None):
    """(per-tensor Fisher, batches counted) of the model parameters `names`, summed over all data-parallel
    ranks; `batches` defaults to `fisher_batches(trainer)`."""
    model, criterion = trainer.get_model(), trainer.get_criterion()
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
    views = list(torch.split(flat, [p.numel() for p in params]))
    # fp16 models: scale the loss like the trainer (fp16 gradients underflow otherwise), unscale in fp32
    scale = float(getattr(getattr(trainer.optimizer, "scaler", None), "loss_scale", None) or 1.0)
    count = torch.zeros(1, dtype=torch.float64, device=flat.device)
    skipped = 0
    devices = [flat.device] if flat.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # training's RNG stream is left where it was
        torch.manual_seed(seed)
        for sample in batches if batches is not None else fisher_batches(trainer):
            raw = torch.autograd.grad(fisher_loss(criterion, model, sample) * scale, params, allow_unused=True)
            grads = [None if g is None else g.float().div_(scale) for g in raw]
            if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                skipped += 1  # an fp16 overflow: this batch is left out
                continue
            for view, g in zip(views, grads):
                if g is not None:
                    view.add_(clip_tensor_(g, clip).reshape(-1).square())
            count += 1
    if skipped:
        logger.warning(f"ChildTuning-D: {skipped} Fisher batch(es) overflowed in fp16 and were left out")
    if trainer.data_parallel_world_size > 1:
        from fairseq.distributed import utils as distributed_utils

        group = trainer.data_parallel_process_group
        flat, count = distributed_utils.all_reduce(flat, group), distributed_utils.all_reduce(count, group)
    n = int(count.item())
    require(n > 0, "--childtuning-mode", "D: the Fisher pass saw no training batch")
    flat.div_(n)
    return [v.view_as(p) for v, p in zip(torch.split(flat, [p.numel() for p in params]), params)], n


# ------------------------------------------------------------------------------------------ the mask
class ChildTuning:
    """The gradient mask of one optimizer: `apply()` before every step; `state_dict()` for checkpoints."""

    def __init__(self, cfg, params: Sequence[torch.Tensor], names: Optional[List[str]], trainer):
        self.mode = str(cfg.childtuning_mode)
        self.p = float(cfg.childtuning_reserve_p)
        self.clip = float(cfg.childtuning_fisher_clip)
        self.seed = int(getattr(cfg, "seed", 1) or 1)
        self.params = list(params)
        self.names = names
        self.selected = self._select(cfg, names)
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        self.masks: Optional[List[Optional[torch.Tensor]]] = None  # D: one bool mask per selected tensor
        self.updates = 0  # F: seeds the update's masks
        self.summary: dict = {}
        self._generators: dict = {}
        self._seeds: dict = {}
        logger.info(f"ChildTuning-{self.mode}: p={self.p}, {sum(self.selected)} of {len(self.params)} tensors masked")

    def _select(self, cfg, names) -> List[bool]:
        require_choice("--childtuning-mode", self.mode, CHILDTUNING_MODES)
        require(0.0 < self.p <= 1.0, "--childtuning-reserve-p", f"must be in (0, 1], got {self.p!r}")
        require_finite_nonnegative("--childtuning-fisher-clip", self.clip)
        include = cfg.childtuning_param_include
        if include is None:
            include = param_filters.ALL if self.mode == "F" else param_filters.ENCODER_LAYERS
        if names is None:
            require(
                include == param_filters.ALL and not cfg.childtuning_param_exclude,
                "--childtuning-param-include",
                f"ChildTuning-{self.mode} selects tensors by name, but the optimizer's {len(self.params)} "
                "tensor(s) have none. Under --fp16 add --fp16-no-flatten-grads (one flat fp32 buffer has no "
                "per-tensor names) or use --memory-efficient-fp16",
            )
            return [True] * len(self.params)
        return param_filters.select(
            names, include, cfg.childtuning_param_exclude, "--childtuning-param-include", "--childtuning-param-exclude"
        )

    # ---------------------------------------------------------------- per step
    @torch.no_grad()
    def apply(self) -> None:
        if self.mode == "D":
            if self.masks is None:
                with torch.enable_grad():
                    self.masks = self.compute_fisher_masks()
            for p, mask in zip(self.params, self.masks):
                if mask is not None and p.grad is not None:
                    p.grad.mul_(mask)
        else:
            self._apply_f()
        self.updates += 1

    def _apply_f(self) -> None:
        """grad * Bernoulli(p) / p (ChildTuningOptimizer.py L62-63)."""
        seed = update_seed(self.seed, self.updates, _F_STREAM)
        for p, selected in zip(self.params, self.selected):
            if selected and p.grad is not None:
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                bernoulli_scale_(grad.view(-1), self.p, self._generator(grad.device, seed), 1.0 / self.p)
                if grad is not p.grad:
                    p.grad.copy_(grad)

    def _generator(self, device, seed: int) -> torch.Generator:
        """The device's generator, reseeded once per update (its tensors continue one stream)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        if self._seeds.get(device) != seed:
            self._generators[device].manual_seed(seed)
            self._seeds[device] = seed
        return self._generators[device]

    # ---------------------------------------------------------------- D: the child network
    def compute_fisher_masks(self, batches=None) -> List[Optional[torch.Tensor]]:
        """The D mask from a Fisher pass through the Trainer that built this optimizer (`batches`: any
        iterable of prepared samples instead of the training set, e.g. for timing)."""
        trainer = self._trainer() if self._trainer is not None else None
        require(
            trainer is not None,
            "--childtuning-mode",
            "D needs the fairseq Trainer that built the optimizer for its Fisher pass (fairseq-train or "
            "fairseq.trainer.Trainer); outside one, load a state with the mask (load_state_dict)",
        )
        assert self.names is not None  # D always selects by name (_select)
        chosen = [i for i, s in enumerate(self.selected) if s]
        start = time.perf_counter()
        fisher, n = fisher_information(trainer, [self.names[i] for i in chosen], self.clip, self.seed, batches)
        child, polar = select_child(fisher, self.p)
        masks: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for i, m in zip(chosen, child):
            masks[i] = m.to(self.params[i].device)
        kept, total = sum(int(m.sum()) for m in child), sum(m.numel() for m in child)
        seconds = time.perf_counter() - start
        self.summary = {"fisher_batches": n, "polar": polar, "kept": kept, "total": total, "seconds": seconds}
        logger.info(
            f"ChildTuning-D: Fisher pass over {n} batches in {seconds:.1f}s; child network = {kept} of {total} "
            f"entries ({kept / max(total, 1):.4f}, threshold {polar:.3e}) of {len(chosen)} tensors"
        )
        return masks

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"mode": self.mode, "updates": self.updates, "masks": self.masks, "summary": dict(self.summary)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        self.updates = int(state.get("updates", 0))
        self.summary = dict(state.get("summary") or {})
        masks = state.get("masks")
        if self.mode == "D" and state.get("mode") == "D" and masks is not None:
            require(
                len(masks) == len(self.params)
                and all(m is None or m.shape == p.shape for m, p in zip(masks, self.params)),
                "--childtuning-mode",
                "the checkpoint's ChildTuning-D mask does not fit this model's parameters; pass --reset-optimizer "
                "to choose a new child network",
            )
            self.masks = [
                None if m is None else m.to(device=p.device, dtype=torch.bool) for m, p in zip(masks, self.params)
            ]


class ChildTuningOptimizer:
    """Mixin placed before a FairseqOptimizer: the ChildTuning mask right before that optimizer's step."""

    # flags from the registered config (fairseq's adamax adds its own four flags in a legacy add_args)
    add_args = FairseqOptimizer.__dict__["add_args"]

    def __init__(self, cfg, params):
        params = list(params)
        names = param_filters.names_for_params(params)  # before the base: SAGE regroups the tensors
        super().__init__(cfg, params)
        self.childtuning = ChildTuning(cfg, params, names, fairseq_patches.building_trainer())

    def step(self, closure=None, scale=1.0, groups=None):
        self.childtuning.apply()
        super().step(closure, scale=scale, groups=groups)
        summary = self.childtuning.summary
        if summary:  # D: the child network's share of the masked entries (the mask ran)
            metrics.log_scalar("childtuning_kept", summary["kept"] / max(summary["total"], 1), round=4)

    def state_dict(self):
        state = super().state_dict()
        state[STATE_KEY] = self.childtuning.state_dict()
        return state

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        state_dict = dict(state_dict)
        child = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict, optimizer_overrides)
        self.childtuning.load_state_dict(child)


@dataclass
class AdamChildTuningConfig(FairseqAdamConfig, ChildTuningConfig):
    pass


@dataclass
class AdamaxChildTuningConfig(AdamaxConfig, ChildTuningConfig):
    pass


@dataclass
class AdamaxSageChildTuningConfig(AdamaxSageConfig, ChildTuningConfig):
    pass


@register_optimizer("adam_childtuning", dataclass=AdamChildTuningConfig)
class FairseqAdamChildTuning(ChildTuningOptimizer, FairseqAdam):
    """fairseq's adam (AdamW-style decay) with ChildTuning's gradient mask: the reference's ChildTuningAdamW."""


@register_optimizer("adamax_childtuning", dataclass=AdamaxChildTuningConfig)
class FairseqAdamaxChildTuning(ChildTuningOptimizer, FairseqAdamax):
    """fairseq's adamax with ChildTuning's gradient mask."""


@register_optimizer("adamax_sage_childtuning", dataclass=AdamaxSageChildTuningConfig)
class FairseqAdamaxSageChildTuning(ChildTuningOptimizer, FairseqAdamaxSage):
    """adamax_sage (SAGE's sensitivity-scaled Adamax) on ChildTuning's masked gradient."""
