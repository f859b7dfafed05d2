"""Noise sampling shared by R3F (embedding noise) and HyPe (hidden-state noise).

Noise is always drawn in fp32 on the tensor's own device (no host->device copy) and added in fp32;
the sum is cast back to the activation dtype. Under fp16/bf16 a tiny eps can still be rounded away at
that cast, so `add_noise` also counts how many entries actually changed (`*_noise_effective`).
"""

from __future__ import annotations

import torch

from robustft_common.validation import require_choice, require_finite_nonnegative

# normal: N(0, eps^2); uniform: U(-eps, eps) (the papers); uniform_one_sided: U[0, eps) (HyPe's code)
NOISE_TYPES = ("normal", "uniform", "uniform_one_sided")


def validate_noise_flags(type_flag: str, noise_type: str, eps_flag: str, eps: float) -> None:
    require_choice(type_flag, noise_type, NOISE_TYPES)
    require_finite_nonnegative(eps_flag, eps)


def sample_noise(
    like: torch.Tensor, eps: float, noise_type: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """fp32 noise with `like`'s shape on `like`'s device."""
    noise = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if noise_type == "normal":
        return noise.normal_(0.0, 1.0, generator=generator).mul_(eps)
    if noise_type == "uniform":
        return noise.uniform_(-eps, eps, generator=generator)
    if noise_type == "uniform_one_sided":
        return noise.uniform_(0.0, eps, generator=generator)
    raise ValueError(f"unknown noise type {noise_type!r}; expected one of {', '.join(NOISE_TYPES)}")


def add_noise(x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + noise computed in fp32 and cast to x.dtype, number of entries that changed).

    The count is a 0-dim tensor (no device sync); divide by x.numel() for the effective fraction.
    """
    noisy = (x.float() + noise).to(x.dtype)
    changed = torch.count_nonzero(noisy - x)  # cheaper than (noisy != x).sum()
    return noisy, changed
