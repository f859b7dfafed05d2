"""Symmetric KL divergence between two categorical distributions given as logits (R3F's consistency term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk = CHUNK_ELEMENTS // vocabulary size: the fp32 temporaries of one chunk stay ~64 MB whatever
# the batch (BART's 50k vocabulary: ~330 target tokens per chunk; class logits: one chunk).
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, width))


def _log_softmax_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, torch.float32)  # fp32 at least (fp64 stays fp64: gradcheck)
    return F.log_softmax(a, dim=-1, dtype=dtype), F.log_softmax(b, dim=-1, dtype=dtype)


class _SymmetricKL(torch.autograd.Function):
    """Per-row KL(p||q) + KL(q||p) computed chunk by chunk, forward and backward.

    Autograd through log_softmax / exp / mul would keep about six fp32 (rows x vocab) tensors alive until
    the backward pass (log p, log q, p, q, p - q, log p - log q): for BART's decoder logits that is the
    memory hotspot of R3F (r3f.md §3.9). This function saves only its two inputs, which the model's graph
    holds anyway, and recomputes one chunk of rows at a time; the backward is the closed form
        d/da = p * (log p - log q - KL(p||q)) + p - q,   d/db = q * (log q - log p - KL(q||p)) + q - p
    for p = softmax(a), q = softmax(b) (checked against autograd in tests/test_seq2seq_cost.py).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        a2, b2 = a.reshape(-1, a.size(-1)), b.reshape(-1, b.size(-1))
        out = a2.new_zeros(a2.size(0), dtype=torch.promote_types(a.dtype, torch.float32))
        step = _chunk_rows(a2.size(-1))
        for start in range(0, rows.numel(), step):
            idx = rows[start : start + step]
            log_p, log_q = _log_softmax_pair(a2[idx], b2[idx])
            # (p - q)(log p - log q): every summand >= 0, so rounding cannot make the result negative
            out[idx] = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
        ctx.save_for_backward(a, b, rows)
        return out.view(a.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b, rows = ctx.saved_tensors
        a2, b2 = a.reshape(-1, a.size(-1)), b.reshape(-1, b.size(-1))
        g = grad_out.reshape(-1)
        grad_a = torch.zeros_like(a2) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b2) if ctx.needs_input_grad[1] else None
        step = _chunk_rows(a2.size(-1))
        for start in range(0, rows.numel(), step):
            idx = rows[start : start + step]
            log_p, log_q = _log_softmax_pair(a2[idx], b2[idx])
            p, q, d = log_p.exp(), log_q.exp(), log_p - log_q
            gi = g[idx].unsqueeze(-1)
            if grad_a is not None:
                kl_pq = (p * d).sum(-1, keepdim=True)
                grad_a[idx] = (gi * (p * (d - kl_pq) + p - q)).to(grad_a.dtype)
            if grad_b is not None:
                kl_qp = -(q * d).sum(-1, keepdim=True)
                grad_b[idx] = (gi * (q * (-d - kl_qp) + q - p)).to(grad_b.dtype)
        return (
            None if grad_a is None else grad_a.view(a.shape),
            None if grad_b is None else grad_b.view(b.shape),
            None,
        )


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p||q) + KL(q||p) per position, in fp32, with p = softmax(logits_p), q = softmax(logits_q).

    Softmax runs over the last dim; the result has shape `logits_p.shape[:-1]`. Positions where the
    boolean `mask` is False are 0 and are not computed (no softmax over a large vocabulary for pads).
    Gradients flow into both inputs; nothing is reduced over positions (callers choose the scale).
    Memory: beyond the inputs, one chunk of rows at a time (`_SymmetricKL`), never a (rows x vocab) copy.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"symmetric_kl: logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    if mask is not None and mask.shape != logits_p.shape[:-1]:
        raise ValueError(
            f"symmetric_kl: mask shape {tuple(mask.shape)} must equal the logits' "
            f"leading shape {tuple(logits_p.shape[:-1])}"
        )
    n_rows = logits_p.numel() // max(1, logits_p.size(-1)) if logits_p.dim() else 1
    if mask is None:
        rows = torch.arange(n_rows, device=logits_p.device)
    else:
        rows = mask.reshape(-1).bool().nonzero().view(-1)
    return _SymmetricKL.apply(logits_p, logits_q, rows)


def gaussian_symmetric_kl(pred_p: torch.Tensor, pred_q: torch.Tensor) -> torch.Tensor:
    """The regression counterpart, per sentence in fp32: MSE is the NLL of N(prediction, 1/2), and the
    symmetric KL of two such Gaussians is 2 * (mean difference)^2."""
    return 2.0 * (pred_p.view(-1).float() - pred_q.view(-1).float()).pow(2)
