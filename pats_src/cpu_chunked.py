"""PATS's elementwise CPU math chunk by chunk, through reused cache-sized buffers.

The same values as the flat kernels of `pats_adamax` bit for bit (tested), and the same draws. Why it
exists: on CPU, model-sized temporaries cost more in page faults than the arithmetic, and bool outputs,
`where` and `masked_fill_` with a random mask are several times slower than float ops; so each tensor
is processed in chunks of `CPU_CHUNK_NUMEL` elements with int32 masks. `benchmarks/run.py --size base
--only adamax,adamax_pats,adamax_pats_flat` measures what it saves (pats_src/README.md, Overhead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# A multiple of every SIMD width: chunking changes no rounding.
CPU_CHUNK_NUMEL = 1 << 16


def applies(chunk_numel: int, tensors: Sequence[Tensor]) -> bool:
    """Chunked math: on CPU, for contiguous tensors (flat views of them are updated in place)."""
    return chunk_numel > 0 and all(t.device.type == "cpu" for t in tensors) and all(t.is_contiguous() for t in tensors)


class Workspace:
    """Reused flat scratch buffers of one device (never part of the optimizer's state dict)."""

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, numel: int, dtype=torch.float32, device="cpu") -> Tensor:
        """A buffer of at least `numel` elements (grown on demand), viewed to `numel`."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def sensitivity_ema(
    params: list[Tensor],
    grads: list[Tensor],
    emas: list[Tensor],
    *,
    beta: float,
    chunk_numel: int,
    workspace: Workspace,
) -> None:
    """sbar <- beta sbar + (1 - beta) |theta * g|: the ops of `_multi_tensor_sensitivity`, chunk by
    chunk through one cached buffer (no model-sized temporary)."""
    for w, g, e in zip(params, grads, emas):
        w, g, e = w.reshape(-1), g.reshape(-1), e.view(-1)
        for start in range(0, e.numel(), chunk_numel):
            stop = min(start + chunk_numel, e.numel())
            sens = workspace.buffer("sens", stop - start, device=e.device)
            torch.mul(w[start:stop], g[start:stop], out=sens).abs_()
            e[start:stop].mul_(beta).add_(sens, alpha=1 - beta)


def bucket_noise(
    params: list[Tensor],
    emas: list[Tensor],
    means: Tensor,
    corr: Tensor | None,
    z: Tensor,
    u: Tensor,
    *,
    sigma: float,
    kappa: float,
    prob: float,
    eps: float,
    cap: float,
    chunk_numel: int,
    workspace: Workspace,
    stats=None,
) -> None:
    """`pats_adamax._bucket_noise` tensor by tensor, chunk by chunk. Dropped entries are cleared with a
    bitwise AND on the noise bits, which gives exactly masked_fill's +0.0, also where z * ratio is inf
    or NaN. `stats` (a `pats_adamax.NoiseStats`) sees the same tensors as in the flat kernel."""
    device = z.device
    offset = 0
    for j, (w, e) in enumerate(zip(params, emas)):
        w, e = w.view(-1), e.view(-1)
        numerator = means[j] if corr is None else means[j] * corr[j]
        for start in range(0, e.numel(), chunk_numel):
            stop = min(start + chunk_numel, e.numel())
            m = stop - start
            ratio = workspace.buffer("ratio", m, device=device)
            keep = workspace.buffer("keep", m, torch.int32, device)
            coin = workspace.buffer("coin", m, torch.int32, device)
            zc, uc = z[offset + start : offset + stop], u[offset + start : offset + stop]
            if corr is None:
                torch.add(e[start:stop], eps, out=ratio)
            else:
                torch.mul(e[start:stop], corr[j], out=ratio).add_(eps)
            torch.div(numerator, ratio, out=ratio)
            torch.ge(ratio, kappa, out=keep)
            keep.bitwise_and_(torch.lt(uc, prob, out=coin))
            if stats is not None:
                stats.ratios(ratio, kappa, cap)
                stats.kept += int(keep.sum())
            if cap > 0:
                ratio.clamp_(max=cap)
            zc.mul_(ratio).mul_(sigma)
            zc.view(torch.int32).bitwise_and_(keep.neg_())  # 1 -> all bits set, 0 -> +0.0
            if stats is not None:
                stats.kicks(zc, w[start:stop])
            w[start:stop].add_(zc)
        offset += e.numel()
