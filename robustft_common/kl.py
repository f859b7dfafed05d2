"""Symmetric KL divergence between two categorical distributions given as logits (R3F's consistency term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _symmetric_kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits_p, dim=-1, dtype=torch.float32)
    log_q = F.log_softmax(logits_q, dim=-1, dtype=torch.float32)
    # KL(p||q) + KL(q||p) = sum_c (p - q)(log p - log q): one pass, and every summand is >= 0
    # (p - q and log p - log q share a sign), so rounding cannot make the result negative.
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p||q) + KL(q||p) per position, in fp32, with p = softmax(logits_p), q = softmax(logits_q).

    Softmax runs over the last dim; the result has shape `logits_p.shape[:-1]`. Positions where the
    boolean `mask` is False are 0 and are not computed (no softmax over a large vocabulary for pads).
    Gradients flow into both inputs; nothing is reduced over positions (callers choose the scale).
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"symmetric_kl: logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    if mask is None:
        return _symmetric_kl_rows(logits_p, logits_q)
    if mask.shape != logits_p.shape[:-1]:
        raise ValueError(
            f"symmetric_kl: mask shape {tuple(mask.shape)} must equal the logits' "
            f"leading shape {tuple(logits_p.shape[:-1])}"
        )
    mask = mask.bool()
    out = logits_p.new_zeros(mask.shape, dtype=torch.float32)
    out[mask] = _symmetric_kl_rows(logits_p[mask], logits_q[mask])
    return out

def gaussian_symmetric_kl(pred_p: torch.Tensor, pred_q: torch.Tensor) -> torch.Tensor:
    """The regression counterpart, per sentence in fp32: MSE is the NLL of N(prediction, 1/2), and the
    symmetric KL of two such Gaussians is 2 * (mean difference)^2."""
    return 2.0 * (pred_p.view(-1).float() - pred_q.view(-1).float()).pow(2)
