"""PATS (Zhang et al., EMNLP 2022): Adamax plus sensitivity-aware parameter noise in every update."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pats_src import cpu_chunked
from pats_src.sensitivity_adamax import (
    GroupTensors,
    SensitivityAdamax,
    _multi_tensor_sensitivity,
    _single_tensor_sensitivity,
    kernel,
    update_seed,
)

# Noise is drawn per bucket of consecutive tensors (bounded temporaries; flat, vectorised math).
NOISE_BUCKET_NUMEL = 1 << 24
# --pats-log-stats: fractions of entries with ratio >= 10^k, and with |noise| >= level * |theta|.
RATIO_DECADES = (0, 1, 2, 3, 4, 5, 6)
KICK_LEVELS = (0.01, 0.1, 1.0)


def noise_buckets(numels: Sequence[int], limit: int = NOISE_BUCKET_NUMEL) -> list[list[int]]:
    """Indices of consecutive tensors grouped so that each group holds at most `limit` elements
    (a bigger tensor gets a bucket of its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > limit:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def default_max_ratio(margin: float) -> float:
    """The default cap on rho: 1 / kappa, the margin mirrored (no margin: no cap)."""
    return 1.0 / margin if margin > 0 else 0.0


def _finite_max(x: Tensor) -> float:
    """max ignoring NaN (0 if empty or all NaN; +inf counts)."""
    if x.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(x, nan=0.0, posinf=math.inf).max())


class NoiseStats:
    """What `--pats-log-stats` logs, accumulated over the chunks/buckets of one step: the distribution
    of the raw ratio rho (before the cap) and of the kick |noise| / |theta| (theta = the weight the noise
    is added to). Both kernels feed it the same tensors, so the flat and chunked paths log equal values."""

    def __init__(self):
        self.n = self.margin = self.kept = 0
        self.ratio_max = self.noise_max = self.kick_max = 0.0
        self.ratio_ge = [0] * len(RATIO_DECADES)
        self.kick_ge = [0] * len(KICK_LEVELS)

    def ratios(self, ratio: Tensor, kappa: float, cap: float) -> None:
        """Raw ratios of some entries (before the cap)."""
        self.n += ratio.numel()
        self.margin += ratio.numel() - int((ratio >= kappa).sum())
        for i, k in enumerate(RATIO_DECADES):
            self.ratio_ge[i] += int((ratio >= 10.0**k).sum())
        top = _finite_max(ratio)
        self.ratio_max = max(self.ratio_max, min(top, cap) if cap > 0 else top)  # = max of the capped

    def kicks(self, noise: Tensor, theta: Tensor) -> None:
        size = noise.abs()
        self.noise_max = max(self.noise_max, _finite_max(size))
        kick = size.div_(theta.abs())  # 0/0 = NaN (no noise on a zero weight) counts as no kick
        self.kick_max = max(self.kick_max, _finite_max(kick))
        for i, level in enumerate(KICK_LEVELS):
            self.kick_ge[i] += int((kick >= level).sum())

    def summary(self) -> dict[str, float]:
        n = self.n
        out = {
            "pats_frac_zeroed_by_margin": self.margin / n,
            "pats_frac_noised": self.kept / n,
            "pats_ratio_max": self.ratio_max,
        }
        out.update({f"pats_frac_ratio_ge_1e{k}": c / n for k, c in zip(RATIO_DECADES, self.ratio_ge)})
        out.update({"pats_noise_max": self.noise_max, "pats_kick_max": self.kick_max})
        out.update({f"pats_frac_kick_ge_{level:g}": c / n for level, c in zip(KICK_LEVELS, self.kick_ge)})
        return out


def _bucket_noise(
    params: list[Tensor],
    emas: list[Tensor],
    means: Tensor,
    counts: Tensor,
    corr: Tensor | None,
    z: Tensor,
    u: Tensor,
    *,
    sigma: float,
    kappa: float,
    prob: float,
    eps: float,
    cap: float,
    stats: NoiseStats | None = None,
) -> None:
    """theta += keep * z * sigma * ratio for one bucket as flat tensors (few, large kernels: the
    accelerator path); `z`, `u` are consumed."""
    ema_flat = torch.cat([e.reshape(-1) for e in emas])
    mean_flat = means.repeat_interleave(counts)
    if corr is not None:
        corr_flat = corr.repeat_interleave(counts)
        ratio = (mean_flat * corr_flat).div_(ema_flat.mul_(corr_flat).add_(eps))
    else:
        ratio = mean_flat.div_(ema_flat.add_(eps))
    keep = (ratio >= kappa) & (u < prob)
    if stats is not None:
        stats.ratios(ratio, kappa, cap)
        stats.kept += int(keep.sum())
    if cap > 0:
        ratio.clamp_(max=cap)
    noise = z.mul_(ratio).mul_(sigma).masked_fill_(keep.logical_not_(), 0)
    if stats is not None:
        stats.kicks(noise, torch.cat([w.reshape(-1) for w in params]))
    torch._foreach_add_(params, [c.view_as(w) for c, w in zip(noise.split(counts.tolist()), params)])


def _add_noise(
    params: list[Tensor],
    emas: list[Tensor],
    steps: list[int],
    *,
    generator: torch.Generator,
    sigma: float,
    beta: float,
    kappa: float,
    prob: float,
    eps: float,
    cap: float,
    ema_bias_correction: bool,
    chunk_numel: int,
    workspace: cpu_chunked.Workspace,
    stats: NoiseStats | None = None,
) -> None:
    """PATS noise on `params` in buckets: per bucket z ~ N(0,1)^n then u ~ U[0,1)^n from `generator`
    (n = bucket numel; this draw order is what DDP replicas and resumed runs rely on)."""
    device = params[0].device
    chunked = cpu_chunked.applies(chunk_numel, params + emas)
    numels = [w.numel() for w in params]
    for bucket in noise_buckets(numels):
        ema = [emas[i] for i in bucket]
        counts = torch.tensor([numels[i] for i in bucket], device=device)
        corr = None
        if ema_bias_correction:
            corr = torch.tensor([1 / (1 - beta ** steps[i]) for i in bucket], device=device, dtype=torch.float32)
        # per-tensor mean of sbar (sbar >= 0, so the L1 norm is the sum)
        means = torch.stack(torch._foreach_norm(ema, 1)).float() / counts
        n = int(sum(numels[i] for i in bucket))
        bucket_params = [params[i] for i in bucket]
        if chunked:  # reused buffers: the same values as fresh tensors from the same generator
            z = torch.randn(n, generator=generator, out=workspace.buffer("z", n, device=device))
            u = torch.rand(n, generator=generator, out=workspace.buffer("u", n, device=device))
            cpu_chunked.bucket_noise(
                bucket_params,
                ema,
                means,
                corr,
                z,
                u,
                sigma=sigma,
                kappa=kappa,
                prob=prob,
                eps=eps,
                cap=cap,
                chunk_numel=chunk_numel,
                workspace=workspace,
                stats=stats,
            )
        else:
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
            _bucket_noise(
                bucket_params,
                ema,
                means,
                counts,
                corr,
                z,
                u,
                sigma=sigma,
                kappa=kappa,
                prob=prob,
                eps=eps,
                cap=cap,
                stats=stats,
            )


class PatsAdamax(SensitivityAdamax):
    r"""PATS: fairseq's Adamax (`SensitivityAdamax`) on every tensor, then sensitivity-aware noise on the
    sensitive ones. Per sensitive tensor W, step t (theta_{t-1} = the weights before the step)::

        s_t    = |theta_{t-1} * g_t|
        sbar_t = beta sbar_{t-1} + (1 - beta) s_t            (sbar_0 = 0; optional / (1 - beta^t))
        theta' = the Adamax update of theta_{t-1}
        rho_j  = mean_W(sbar_t) / (sbar_{t,j} + eps),  then capped: rho_j <= max_ratio
        keep_j = [rho_j >= kappa] * [u_j < p],  u_j ~ U[0, 1)
        theta_t = theta' + keep * z * sigma * rho  (* lr with pats_noise_lr_scaled),  z ~ N(0, 1)

    Low-sensitivity entries get noise larger than sigma; kappa zeroes the noise of the most sensitive
    entries (rho < kappa). The cap is not in the paper: rho grows without bound as sbar_j -> 0 (theta_j
    or g_j ~ 0); uncapped, MiniLM on RTE got rho up to 1.2e6 and a noise of 1.09 on weights of RMS 0.065
    in one step (pats_src/README.md). Its default, 1 / kappa, mirrors the margin: the noise std stays
    within [kappa sigma, sigma / kappa]. Draws come from a generator reseeded with
    `update_seed(seed, update number)` at every step: DDP replicas draw the same noise, a resumed run
    what the uninterrupted one would have.

    Args: those of `SensitivityAdamax`, plus the PATS constants (`pats_noise` sigma, `pats_beta` beta,
    `pats_margin` kappa, `pats_eps` eps, `pats_prob` p, `pats_noise_lr_scaled`,
    `pats_ema_bias_correction`, `pats_max_ratio`: None = 1 / kappa (0 if kappa is 0), 0 = uncapped as in
    the paper) and
        log_stats: measure the noise (`NoiseStats`) into `last_stats` every step (a few reductions).
    """

    def __init__(
        self,
        params,
        sensitive=None,
        no_weight_decay=None,
        *,
        pats_noise: float = 1e-6,
        pats_beta: float = 0.75,
        pats_margin: float = 5e-3,
        pats_eps: float = 1e-12,
        pats_prob: float = 0.5,
        pats_noise_lr_scaled: bool = False,
        pats_ema_bias_correction: bool = False,
        pats_max_ratio: float | None = None,
        log_stats: bool = False,
        **adamax,
    ):
        if pats_max_ratio is None:
            pats_max_ratio = default_max_ratio(pats_margin)
        super().__init__(
            params,
            sensitive,
            no_weight_decay,
            method_defaults=dict(
                pats_noise=pats_noise,
                pats_beta=pats_beta,
                pats_margin=pats_margin,
                pats_eps=pats_eps,
                pats_prob=pats_prob,
                pats_noise_lr_scaled=pats_noise_lr_scaled,
                pats_ema_bias_correction=pats_ema_bias_correction,
                pats_max_ratio=pats_max_ratio,
            ),
            **adamax,
        )
        self.log_stats = log_stats
        self.cpu_chunk_numel = cpu_chunked.CPU_CHUNK_NUMEL  # 0 = the flat kernels on CPU too
        self._workspaces: dict[torch.device, cpu_chunked.Workspace] = {}
        self._seeded: set = set()
        self._stats: NoiseStats | None = None

    def _begin_step(self) -> None:
        self._seeded = set()
        self._stats = NoiseStats() if self.log_stats else None

    def _end_step(self) -> None:
        self.last_stats = self._stats.summary() if self._stats is not None and self._stats.n else {}

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """The device's generator, seeded once per step (groups continue one stream)."""
        gen = self.generator(device)
        if device not in self._seeded:
            gen.manual_seed(update_seed(self.seed, self.global_state["updates"]))
            self._seeded.add(device)
        return gen

    def _workspace(self, device: torch.device) -> cpu_chunked.Workspace:
        return self._workspaces.setdefault(device, cpu_chunked.Workspace())

    def _update_group(self, group, tensors: GroupTensors) -> None:
        if not (group["sensitive"] and group["pats_noise"] > 0):
            return self.adamax_update(group, tensors)
        params32, emas = tensors.params32, tensors.state_list("sensitivity")
        device = params32[0].device
        if cpu_chunked.applies(self.cpu_chunk_numel, params32 + emas):
            cpu_chunked.sensitivity_ema(
                params32,
                tensors.grads,
                emas,
                beta=group["pats_beta"],
                chunk_numel=self.cpu_chunk_numel,
                workspace=self._workspace(device),
            )
        else:
            kernel(_single_tensor_sensitivity, _multi_tensor_sensitivity, params32, self.foreach)(
                params32, tensors.grads, emas, beta=group["pats_beta"]
            )
        self.adamax_update(group, tensors)
        sigma = group["pats_noise"]
        if group["pats_noise_lr_scaled"]:
            sigma = sigma * group["lr"]
        _add_noise(
            params32,
            emas,
            [s["step"] for s in tensors.states],
            generator=self._noise_generator(device),
            sigma=sigma,
            beta=group["pats_beta"],
            kappa=group["pats_margin"],
            prob=group["pats_prob"],
            eps=group["pats_eps"],
            cap=group["pats_max_ratio"],
            ema_bias_correction=group["pats_ema_bias_correction"],
            chunk_numel=self.cpu_chunk_numel,
            workspace=self._workspace(device),
            stats=self._stats,
        )
