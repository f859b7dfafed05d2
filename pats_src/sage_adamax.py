"""SAGE (Liang et al., ICLR 2022): Adamax with sensitivity-guided element-wise learning rates."""

from __future__ import annotations

import torch
from torch import Tensor

from pats_src.sensitivity_adamax import (
    GroupTensors,
    SensitivityAdamax,
    _multi_tensor_moments,
    _multi_tensor_sensitivity,
    _single_tensor_moments,
    _single_tensor_sensitivity,
    kernel,
)


def _single_tensor_sage(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    sens: list[Tensor],
    emas: list[Tensor],
    corrections: list[float],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    sage_eps: float,
) -> None:
    """theta -= lr * |I - Ibar| / (Ibar + e^2) * (m / (u + eps) * c + wd * theta)."""
    _single_tensor_moments(grads, exp_avgs, exp_infs, beta1=beta1, beta2=beta2)
    for w, s, ibar, m, u, c in zip(params, sens, emas, exp_avgs, exp_infs, corrections):
        factor = (s - ibar).abs_().div_(ibar + sage_eps)
        direction = (m / (u + eps)).mul_(c)
        if weight_decay != 0:
            direction.add_(w, alpha=weight_decay)
        w.addcmul_(factor, direction, value=-lr)


def _multi_tensor_sage(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    sens: list[Tensor],
    emas: list[Tensor],
    corrections: list[float],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    sage_eps: float,
) -> None:
    _multi_tensor_moments(grads, exp_avgs, exp_infs, beta1=beta1, beta2=beta2)
    factor = torch._foreach_sub(sens, emas)
    torch._foreach_abs_(factor)
    torch._foreach_div_(factor, torch._foreach_add(emas, sage_eps))
    direction = torch._foreach_div(exp_avgs, torch._foreach_add(exp_infs, eps))
    torch._foreach_mul_(direction, corrections)
    if weight_decay != 0:
        torch._foreach_add_(direction, params, alpha=weight_decay)
    torch._foreach_mul_(direction, factor)
    torch._foreach_add_(params, direction, alpha=-lr)


class SageAdamax(SensitivityAdamax):
    r"""SAGE's Adamax (`UnstructAwareAdamax`, cliang1453/SAGE `module/bert_optim.py`) on the sensitive
    tensors; fairseq's Adamax (`SensitivityAdamax`) on the others.

    Sensitive tensors, every step t (theta_{t-1} = the weights before this step)::

        I_t    = |theta_{t-1} * g_t|
        Ibar_t = beta3 Ibar_{t-1} + (1 - beta3) I_t          (Ibar_0 = 0, no bias correction)
        m_t, u_t, c_t as in SensitivityAdamax
        d_t    = c_t m_t / (u_t + eps) + lambda theta_{t-1}   (decay added before the scaling, as SAGE)
        theta_t = theta_{t-1} - gamma |I_t - Ibar_t| / (Ibar_t + e2) * d_t

    At t = 1 the factor |I - Ibar| / Ibar is beta3 / (1 - beta3). SAGE's own settings: no bias
    correction (c_t = 1) and lambda = 0 for biases and LayerNorm (`no_weight_decay`).

    Args: those of `SensitivityAdamax`, plus
        sage_beta3: EMA decay beta3 of the sensitivity.
        sage_eps: the guard e2 (SAGE's e^2 = 1e-12).
    """

    def __init__(
        self,
        params,
        sensitive=None,
        no_weight_decay=None,
        *,
        sage_beta3: float = 0.75,
        sage_eps: float = 1e-12,
        **adamax,
    ):
        super().__init__(
            params, sensitive, no_weight_decay, method_defaults=dict(sage_beta3=sage_beta3, sage_eps=sage_eps), **adamax
        )

    def _update_group(self, group, tensors: GroupTensors) -> None:
        if not group["sensitive"]:
            return self.adamax_update(group, tensors)
        params32, emas = tensors.params32, tensors.state_list("sensitivity")
        sens = kernel(_single_tensor_sensitivity, _multi_tensor_sensitivity, params32, self.foreach)(
            params32, tensors.grads, emas, beta=group["sage_beta3"]
        )
        beta1, beta2 = group["betas"]
        corrections = [1 / (1 - beta1 ** s["step"]) if group["bias_correction"] else 1.0 for s in tensors.states]
        kernel(_single_tensor_sage, _multi_tensor_sage, params32, self.foreach)(
            params32,
            tensors.grads,
            tensors.state_list("exp_avg"),
            tensors.state_list("exp_inf"),
            sens,
            emas,
            corrections,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            sage_eps=group["sage_eps"],
        )
