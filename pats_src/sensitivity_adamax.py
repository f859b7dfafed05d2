"""fairseq's Adamax as a torch optimizer that PATS (`pats_adamax.PatsAdamax`) and SAGE
(`sage_adamax.SageAdamax`) extend on a selected set of tensors (pure torch, no fairseq).

Layout follows `torch/optim/adamax.py`: the maths in the class docstrings, the arithmetic in pure
module-level kernels, each in a per-tensor (`_single_tensor_*`) and a foreach (`_multi_tensor_*`)
version with the same values, chosen by one dispatcher (`kernel`). The optimizer classes only gather
tensors and state and call kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
_SEED_MIX = 0x9E3779B97F4A7C15


def update_seed(seed: int, update: int, stream: int = 0) -> int:
    """A 63-bit seed that differs for every (seed, update, stream) and is the same on every rank."""
    return (((seed + 1) * _SEED_MIX) ^ (update * 0xBF58476D1CE4E5B9) ^ (stream * 0x94D049BB133111EB)) % (1 << 63)


def kernel(single_tensor: Callable, multi_tensor: Callable, params: Sequence[Tensor], foreach: bool | None) -> Callable:
    """The one dispatcher: the foreach kernel, or the per-tensor one. `foreach=None` picks foreach when
    every tensor is on one device (torch's foreach ops need a single device per list)."""
    if foreach is None:
        foreach = len({p.device for p in params}) <= 1
    return multi_tensor if foreach else single_tensor


# ----------------------------------------------------------------------------------- Adamax kernels
def _single_tensor_moments(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_infs: list[Tensor], *, beta1: float, beta2: float
) -> None:
    """m <- beta1 m + (1 - beta1) g;  u <- max(beta2 u, |g|)  (fairseq/optim/adamax.py:148-155)."""
    for m, u, g in zip(exp_avgs, exp_infs, grads):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        torch.max(u.mul_(beta2), g.abs(), out=u)


def _multi_tensor_moments(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_infs: list[Tensor], *, beta1: float, beta2: float
) -> None:
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_infs, beta2)
    torch._foreach_maximum_(exp_infs, torch._foreach_abs(grads))


def _single_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    step_sizes: list[float],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    """fairseq's Adamax update (fairseq/optim/adamax.py:147-167): decoupled decay with the plain lr,
    then theta -= step_size * m / (u + eps)."""
    _single_tensor_moments(grads, exp_avgs, exp_infs, beta1=beta1, beta2=beta2)
    for w, m, u, step_size in zip(params, exp_avgs, exp_infs, step_sizes):
        if weight_decay != 0:
            w.add_(w, alpha=-weight_decay * lr)
        w.addcdiv_(m, u.add(eps), value=-step_size)


def _multi_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    step_sizes: list[float],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    _multi_tensor_moments(grads, exp_avgs, exp_infs, beta1=beta1, beta2=beta2)
    if weight_decay != 0:
        torch._foreach_add_(params, params, alpha=-weight_decay * lr)
    denoms = torch._foreach_add(exp_infs, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-s for s in step_sizes])


# ------------------------------------------------------------------------------ sensitivity kernels
def _single_tensor_sensitivity(
    params: list[Tensor], grads: list[Tensor], emas: list[Tensor], *, beta: float
) -> Sequence[Tensor]:
    """s = |theta * g| (theta before the step, as SAGE);  sbar <- beta sbar + (1 - beta) s.
    Returns s (SAGE needs it)."""
    sens = [(w * g).abs_() for w, g in zip(params, grads)]
    for e, s in zip(emas, sens):
        e.mul_(beta).add_(s, alpha=1 - beta)
    return sens


def _multi_tensor_sensitivity(
    params: list[Tensor], grads: list[Tensor], emas: list[Tensor], *, beta: float
) -> Sequence[Tensor]:
    sens = torch._foreach_mul(params, grads)
    torch._foreach_abs_(sens)
    torch._foreach_mul_(emas, beta)
    torch._foreach_add_(emas, sens, alpha=1 - beta)
    return sens


# ------------------------------------------------------------------------------------- optimizer
@dataclass
class GroupTensors:
    """What one step of one parameter group works on: parameters with a gradient, their fp32 views
    (copies for fp16/bf16 parameters, written back after the step), gradients (fp32) and state."""

    params: list[Tensor]
    params32: list[Tensor]
    grads: list[Tensor]
    states: list[dict]

    def state_list(self, key: str) -> list[Tensor]:
        return [s[key] for s in self.states]


class SensitivityAdamax(torch.optim.Optimizer):
    r"""fairseq's Adamax (`fairseq/optim/adamax.py`, bit for bit), the base of PATS and SAGE.

    Every tensor, every step t (lr gamma, betas beta1/beta2, eps, weight decay lambda)::

        g_t   = grad of theta_{t-1}
        m_t   = beta1 m_{t-1} + (1 - beta1) g_t
        u_t   = max(beta2 u_{t-1}, |g_t|)
        c_t   = 1 / (1 - beta1^t)    (1 with bias_correction=False)
        theta_t = theta_{t-1} - gamma lambda theta_{t-1} - gamma c_t m_t / (u_t + eps)

    (eps outside the infinity norm, decay decoupled and with the plain lr: fairseq's choices.)
    Subclasses change the update of the `sensitive` tensors; the others always get the one above.

    Math in fp32: fp16/bf16 parameters are updated through fp32 copies, and the state stays fp32
    (also across `load_state_dict`, where torch would cast it to the parameter dtype).

    Args:
        params: tensors (not groups; the groups are built from `sensitive` and `no_weight_decay`).
        sensitive: bool per tensor, True = the subclass's method applies (see
            `robustft_common.param_filters`). Sensitive tensors keep a `sensitivity` EMA in their state.
        no_weight_decay: bool per tensor, True = lambda = 0 for it (SAGE exempts biases and LayerNorm).
        seed: base seed of the method's random draws (fairseq's --seed).
        foreach: None = foreach kernels when every tensor is on one device, else per-tensor kernels.
        method_defaults: a subclass's own hyperparameters (stored in every parameter group).
    """

    supports_memory_efficient_fp16 = True
    # Per-tensor means and name-based selection are meaningless on one flat fp32 buffer.
    supports_flat_params = False

    def __init__(
        self,
        params,
        sensitive: Sequence[bool] | None = None,
        no_weight_decay: Sequence[bool] | None = None,
        *,
        lr: float = 2e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        seed: int = 1,
        foreach: bool | None = None,
        method_defaults: dict | None = None,
    ):
        params = list(params)
        if params and isinstance(params[0], dict):
            raise ValueError(f"{type(self).__name__} takes a list of tensors (selection via `sensitive`)")
        sensitive = self._mask("sensitive", sensitive, len(params))
        no_decay = self._mask("no_weight_decay", no_weight_decay, len(params))
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            **(method_defaults or {}),
        )
        # Group order: sensitive first (the layout checkpoints of earlier versions have when no tensor
        # is exempt from decay: fairseq's optimizer state indexes tensors across groups in order).
        groups = []
        for is_sensitive in (True, False):
            for exempt in (False, True):
                members = [p for p, s, d in zip(params, sensitive, no_decay) if s == is_sensitive and d == exempt]
                if members:
                    group: dict[str, object] = {"params": members, "sensitive": is_sensitive}
                    if exempt:
                        group["weight_decay"] = 0.0
                    groups.append(group)
        super().__init__(groups or [{"params": []}], defaults)
        self.seed = int(seed)
        self.foreach = foreach
        # Filled by subclasses that measure something per step (logged by the fairseq wrapper).
        self.last_stats: dict[str, float] = {}
        # Checkpointed with the optimizer state (see state_dict): the update counter seeds the noise.
        self.global_state = {"updates": 0, "noisytune_done": False}
        self._generators: dict[torch.device, torch.Generator] = {}

    @staticmethod
    def _mask(name: str, mask: Sequence[bool] | None, n: int) -> list[bool]:
        mask = [False] * n if mask is None else [bool(m) for m in mask]
        if len(mask) != n:
            raise ValueError(f"`{name}` has {len(mask)} entries for {n} tensors")
        return mask

    # ---------------------------------------------------------------- state (checkpoints)
    def state_dict(self):
        sd = super().state_dict()
        sd["robustft"] = dict(self.global_state)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.global_state.update(state_dict.pop("robustft", {}))
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts float state to the parameter dtype (fp16 under --memory-efficient-fp16): put
        # the saved fp32 moments back so a resumed run continues exactly.
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in saved.get(index, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
                index += 1

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_state["updates"] += 1
        self._begin_step()
        for group in self.param_groups:
            tensors = self._init_group(group)
            if tensors.params:
                self._update_group(group, tensors)
                for p, p32 in zip(tensors.params, tensors.params32):
                    if p is not p32:
                        p.copy_(p32)
        self._end_step()
        return loss

    # Subclass hooks around the groups of one step (not a `step` override: torch wraps each class's
    # `step` with its hooks, and a subclass calling a wrapped base step would run them twice).
    def _begin_step(self) -> None:
        pass

    def _end_step(self) -> None:
        pass

    def _init_group(self, group) -> GroupTensors:
        tensors = GroupTensors([], [], [], [])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_inf"] = torch.zeros_like(p, dtype=torch.float32)
                if group["sensitive"]:
                    state["sensitivity"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            tensors.params.append(p)
            tensors.params32.append(p.float() if p.dtype in LOW_PRECISION else p)
            tensors.grads.append(p.grad.float())  # a copy only for low precision; never modified in place
            tensors.states.append(state)
        return tensors

    def _update_group(self, group, tensors: GroupTensors) -> None:
        """The update of one group; subclasses replace it for their sensitive groups."""
        self.adamax_update(group, tensors)

    def adamax_update(self, group, tensors: GroupTensors) -> None:
        beta1, beta2 = group["betas"]
        kernel(_single_tensor_adamax, _multi_tensor_adamax, tensors.params32, self.foreach)(
            tensors.params32,
            tensors.grads,
            tensors.state_list("exp_avg"),
            tensors.state_list("exp_inf"),
            self.step_sizes(group, tensors),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )

    @staticmethod
    def step_sizes(group, tensors: GroupTensors) -> list[float]:
        """gamma c_t per tensor (fairseq/optim/adamax.py:157-160: lr / (1 - beta1^t))."""
        if not group["bias_correction"]:
            return [group["lr"]] * len(tensors.states)
        beta1 = group["betas"][0]
        return [group["lr"] / (1 - beta1 ** s["step"]) for s in tensors.states]

    # ---------------------------------------------------------------- NoisyTune
    @torch.no_grad()
    def noisytune_(self, noise_lambda: float, selected: Sequence[Tensor] | None = None) -> dict:
        """W += U(-lambda/2, lambda/2) * std(W) per tensor, once (Wu et al. 2022).

        std is the unbiased std of the whole tensor in fp32; one-element tensors (std undefined) are
        skipped. Uniforms come from a generator seeded from (seed, stream 1), tensor by tensor in
        parameter-group order, so every replica perturbs identically.
        """
        targets = list(selected) if selected is not None else [p for g in self.param_groups for p in g["params"]]
        report = {"perturbed": 0, "skipped_single_element": 0}
        seeded = set()
        for p in targets:
            gen = self.generator(p.device)
            if p.device not in seeded:
                gen.manual_seed(update_seed(self.seed, 0, stream=1))
                seeded.add(p.device)
            if p.numel() < 2:
                report["skipped_single_element"] += 1
                continue
            w32 = p.float()
            noise = torch.rand(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            noise.sub_(0.5).mul_(noise_lambda * w32.std())
            p.copy_(w32.add_(noise))
            report["perturbed"] += 1
        return report
