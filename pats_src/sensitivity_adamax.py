"""fairseq's Adamax plus sensitivity-aware extras on a selected set of tensors (pure torch, no fairseq).

mode "pats": after the Adamax step add PATS noise  m_j * n_j,  n_j ~ N(0, sigma_j^2),
    sigma_j = sigma * rho_j,  rho_j = mean_W(sbar) / (sbar_j + eps),  sigma_j = 0 where rho_j < kappa,
    m_j ~ Bernoulli(p),  sbar <- beta * sbar + (1 - beta) * |theta * g|  (theta before the step).
mode "sage": SAGE (Liang et al. 2022, `UnstructAwareAdamax`) scales the Adamax direction element-wise by
    |I - Ibar| / (Ibar + e),  I = |theta * g|,  Ibar <- beta3 * Ibar + (1 - beta3) * I.
Unselected tensors (and every tensor with the extras off) get exactly fairseq's `adamax` update
(`fairseq/optim/adamax.py`: decoupled weight decay with the unscaled lr, bias correction on the first
moment only, eps outside the infinity norm).

Noise is drawn from a generator reseeded from (seed, update number) at every update: all DDP replicas
draw the same noise, and a resumed run draws what the uninterrupted one would have.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Noise is drawn per bucket of consecutive tensors (bounded temporaries; flat, vectorised math).
NOISE_BUCKET_NUMEL = 1 << 24
# CPU: the elementwise PATS math runs tensor by tensor in chunks this long, so its temporaries stay in
# cache and are reused (fresh 64 MB temporaries cost more in page faults than the arithmetic). A multiple
# of every SIMD width: chunking changes no rounding.
CPU_CHUNK_NUMEL = 1 << 16
_SEED_MIX = 0x9E3779B97F4A7C15


def update_seed(seed: int, update: int, stream: int = 0) -> int:
    """A 63-bit seed that differs for every (seed, update, stream) and is the same on every rank."""
    return (((seed + 1) * _SEED_MIX) ^ (update * 0xBF58476D1CE4E5B9) ^ (stream * 0x94D049BB133111EB)) \
        % (1 << 63)


def noise_buckets(numels: Sequence[int], limit: int = NOISE_BUCKET_NUMEL) -> List[List[int]]:
    """Indices of consecutive tensors grouped so that each group holds at most `limit` elements
    (a bigger tensor gets a bucket of its own)."""
    buckets, current, size = [], [], 0
    for i, n in enumerate(numels):
        if current and size + n > limit:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


class SensitivityAdamax(torch.optim.Optimizer):
    """Adamax (as fairseq's) + PATS noise or SAGE scaling on `sensitive` tensors.

    Args:
        params: tensors (not groups).
        sensitive: bool per tensor, True = PATS/SAGE applies (see `robustft_common.param_filters`).
        mode: "pats" or "sage".
        seed: base seed of the PATS noise generator (fairseq's --seed).
        foreach: None = foreach kernels when every tensor is on one device, else per-tensor loop.
        log_stats: compute PATS noise statistics (see `last_stats`); costs a few reductions and syncs.
    """

    def __init__(self, params, sensitive: Optional[Sequence[bool]] = None, mode: str = "pats",
                 lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bias_correction: bool = True, pats_noise: float = 1e-6, pats_beta: float = 0.75,
                 pats_margin: float = 5e-3, pats_eps: float = 1e-12, pats_prob: float = 0.5,
                 pats_noise_lr_scaled: bool = False, pats_ema_bias_correction: bool = False,
                 pats_max_ratio: float = 0.0, sage_beta3: float = 0.75, sage_eps: float = 1e-12,
                 seed: int = 1, foreach: Optional[bool] = None, log_stats: bool = False):
        if mode not in ("pats", "sage"):
            raise ValueError(f"mode must be 'pats' or 'sage', got {mode!r}")
        params = list(params)
        if params and isinstance(params[0], dict):
            raise ValueError("SensitivityAdamax takes a list of tensors (selection via `sensitive`)")
        sensitive = [False] * len(params) if sensitive is None else list(sensitive)
        if len(sensitive) != len(params):
            raise ValueError(f"`sensitive` has {len(sensitive)} entries for {len(params)} tensors")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, pats_noise=pats_noise, pats_beta=pats_beta,
                        pats_margin=pats_margin, pats_eps=pats_eps, pats_prob=pats_prob,
                        pats_noise_lr_scaled=pats_noise_lr_scaled,
                        pats_ema_bias_correction=pats_ema_bias_correction,
                        pats_max_ratio=pats_max_ratio, sage_beta3=sage_beta3, sage_eps=sage_eps)
        groups = [{"params": [p for p, s in zip(params, sensitive) if s], "sensitive": True},
                  {"params": [p for p, s in zip(params, sensitive) if not s], "sensitive": False}]
        super().__init__([g for g in groups if g["params"]] or [{"params": []}], defaults)
        self.mode = mode
        self.seed = int(seed)
        self.foreach = foreach
        self.log_stats = log_stats
        self.last_stats: Dict[str, float] = {}
        # Checkpointed with the optimizer state (see state_dict): the update counter seeds the noise.
        self.global_state = {"updates": 0, "noisytune_done": False}
        self._generators: Dict[torch.device, torch.Generator] = {}
        # Reused scratch buffers per device (CPU path); never part of the state dict.
        self._workspace: Dict[torch.device, Dict[str, torch.Tensor]] = {}
        self.cpu_chunk_numel = CPU_CHUNK_NUMEL  # 0 = flat bucket math on CPU too (accelerator path)

    supports_memory_efficient_fp16 = True
    # Per-tensor means and name-based selection are meaningless on one flat fp32 buffer.
    supports_flat_params = False

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

    def _scratch(self, device: torch.device, name: str, numel: int, dtype=torch.float32) -> torch.Tensor:
        """A reused flat buffer of at least `numel` elements (grown on demand)."""
        buffers = self._workspace.setdefault(device, {})
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _chunked(self, device: torch.device, tensors: Sequence[torch.Tensor]) -> bool:
        """Chunk-by-chunk math: on CPU, for contiguous tensors (flat views of them are updated in place)."""
        return device.type == "cpu" and self.cpu_chunk_numel > 0 and all(t.is_contiguous() for t in tensors)

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_state["updates"] += 1
        self.last_stats = {}
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group):
        params, params32, grads, states = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("adamax_pats/adamax_sage do not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_inf"] = torch.zeros_like(p, dtype=torch.float32)
                if group["sensitive"]:
                    state["sensitivity"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            params.append(p)
            params32.append(p.float() if p.dtype in LOW_PRECISION else p)
            grads.append(p.grad.float())  # a copy only for low precision; never modified in place
            states.append(state)
        if not params:
            return
        sensitive = group["sensitive"]
        pats = sensitive and self.mode == "pats" and group["pats_noise"] > 0
        sage = sensitive and self.mode == "sage"
        use_foreach = self.foreach
        if use_foreach is None:
            use_foreach = len({p.device for p in params}) == 1
        if pats or sage:
            # sensitivity |theta * g| with theta before this step (as SAGE)
            ema_beta = group["pats_beta"] if pats else group["sage_beta3"]
            emas = [s["sensitivity"] for s in states]
            if pats and self._chunked(params32[0].device, params32 + emas):
                self._update_ema_chunked(params32, grads, emas, ema_beta)
            elif use_foreach:
                sens = torch._foreach_mul(params32, grads)
                torch._foreach_abs_(sens)
                torch._foreach_mul_(emas, ema_beta)
                torch._foreach_add_(emas, sens, alpha=1 - ema_beta)
            else:
                sens = [(w * g).abs_() for w, g in zip(params32, grads)]
                for e, s in zip(emas, sens):
                    e.mul_(ema_beta).add_(s, alpha=1 - ema_beta)
        if sage:
            self._sage_update(group, params32, grads, states, sens, emas, use_foreach)
        else:
            self._adamax_update(group, params32, grads, states, use_foreach)
        if pats:
            self._add_pats_noise(group, params32, states, emas)
        low = [(p, p32) for p, p32 in zip(params, params32) if p is not p32]
        for p, p32 in low:
            p.copy_(p32)

    def _update_ema_chunked(self, params32, grads, emas, beta):
        """sbar <- beta * sbar + (1 - beta) * |theta * g|, the same ops as the foreach path, chunk by chunk
        through one cached buffer (no model-sized temporary)."""
        size = self.cpu_chunk_numel
        for w, g, e in zip(params32, grads, emas):
            w, g, e = w.reshape(-1), g.reshape(-1), e.view(-1)
            for start in range(0, e.numel(), size):
                stop = min(start + size, e.numel())
                sens = self._scratch(e.device, "sens", stop - start)
                torch.mul(w[start:stop], g[start:stop], out=sens).abs_()
                e[start:stop].mul_(beta).add_(sens, alpha=1 - beta)

    def _moments(self, group, grads, states, use_foreach):
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_infs = [s["exp_inf"] for s in states]
        if use_foreach:
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
            torch._foreach_mul_(exp_infs, beta2)
            torch._foreach_maximum_(exp_infs, torch._foreach_abs(grads))
        else:
            for m, u, g in zip(exp_avgs, exp_infs, grads):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                torch.max(u.mul_(beta2), g.abs(), out=u)
        return exp_avgs, exp_infs

    def _step_sizes(self, group, states):
        beta1 = group["betas"][0]
        if not group["bias_correction"]:
            return [group["lr"]] * len(states)
        return [group["lr"] / (1 - beta1 ** s["step"]) for s in states]

    def _adamax_update(self, group, params32, grads, states, use_foreach):
        exp_avgs, exp_infs = self._moments(group, grads, states, use_foreach)
        step_sizes = self._step_sizes(group, states)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        if use_foreach:
            if wd != 0:
                torch._foreach_add_(params32, params32, alpha=-wd * lr)
            denoms = torch._foreach_add(exp_infs, eps)
            torch._foreach_addcdiv_(params32, exp_avgs, denoms, [-s for s in step_sizes])
        else:
            for w, m, u, step_size in zip(params32, exp_avgs, exp_infs, step_sizes):
                if wd != 0:
                    w.add_(w, alpha=-wd * lr)
                w.addcdiv_(m, u.add(eps), value=-step_size)

    def _sage_update(self, group, params32, grads, states, sens, emas, use_foreach):
        """theta -= lr * |I - Ibar| / (Ibar + e) * (m / (u + eps) * bias_corr + wd * theta)."""
        exp_avgs, exp_infs = self._moments(group, grads, states, use_foreach)
        lr, wd, eps, e = group["lr"], group["weight_decay"], group["eps"], group["sage_eps"]
        beta1 = group["betas"][0]
        corrections = [1 / (1 - beta1 ** s["step"]) if group["bias_correction"] else 1.0
                       for s in states]
        if use_foreach:
            factor = torch._foreach_sub(sens, emas)
            torch._foreach_abs_(factor)
            torch._foreach_div_(factor, torch._foreach_add(emas, e))
            direction = torch._foreach_div(exp_avgs, torch._foreach_add(exp_infs, eps))
            torch._foreach_mul_(direction, corrections)
            if wd != 0:
                torch._foreach_add_(direction, params32, alpha=wd)
            torch._foreach_mul_(direction, factor)
            torch._foreach_add_(params32, direction, alpha=-lr)
        else:
            for w, s, ibar, m, u, c in zip(params32, sens, emas, exp_avgs, exp_infs, corrections):
                factor = (s - ibar).abs_().div_(ibar + e)
                direction = (m / (u + eps)).mul_(c)
                if wd != 0:
                    direction.add_(w, alpha=wd)
                w.addcmul_(factor, direction, value=-lr)

    def _add_pats_noise(self, group, params32, states, emas):
        """Bucketed: per bucket draw z ~ N(0,1)^n then u ~ U[0,1)^n, n = bucket numel (draw order fixed:
        DDP replicas and resumed runs depend on it), then theta += keep * z * sigma * ratio."""
        sigma = group["pats_noise"]
        if group["pats_noise_lr_scaled"]:
            sigma = sigma * group["lr"]
        device = params32[0].device
        chunked = self._chunked(device, params32 + list(emas))
        gen = self.generator(device)
        gen.manual_seed(update_seed(self.seed, self.global_state["updates"]))
        numels = [w.numel() for w in params32]
        stats = {"n": 0, "margin": 0, "kept": 0, "ratio_max": 0.0} if self.log_stats else None
        for bucket in noise_buckets(numels):
            ema = [emas[i] for i in bucket]
            counts = torch.tensor([numels[i] for i in bucket], device=device)
            if group["pats_ema_bias_correction"]:
                corr = torch.tensor([1 / (1 - group["pats_beta"] ** states[i]["step"]) for i in bucket],
                                    device=device, dtype=torch.float32)
            else:
                corr = None
            # per-tensor mean of sbar (sbar >= 0, so the L1 norm is the sum)
            means = torch.stack(torch._foreach_norm(ema, 1)).float() / counts
            n = int(sum(numels[i] for i in bucket))
            if chunked:  # reused buffers: same values as fresh tensors from the same generator
                z = torch.randn(n, generator=gen, out=self._scratch(device, "z", n))
                u = torch.rand(n, generator=gen, out=self._scratch(device, "u", n))
                self._noise_chunked(group, [params32[i] for i in bucket], ema, means, corr, z, u,
                                    sigma, stats)
            else:
                z = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
                u = torch.rand(n, generator=gen, device=device, dtype=torch.float32)
                self._noise_flat(group, [params32[i] for i in bucket], ema, means, counts, corr, z, u,
                                 sigma, stats)
            if stats is not None:
                stats["n"] += n
        if stats is not None and stats["n"]:
            self.last_stats = {"pats_frac_zeroed_by_margin": float(stats["margin"]) / stats["n"],
                               "pats_frac_noised": float(stats["kept"]) / stats["n"],
                               "pats_ratio_max": float(stats["ratio_max"])}

    @staticmethod
    def _noise_flat(group, params, ema, means, counts, corr, z, u, sigma, stats):
        """One bucket as flat tensors (few, large kernels: the accelerator path)."""
        kappa, p_keep = group["pats_margin"], group["pats_prob"]
        eps, cap = group["pats_eps"], group["pats_max_ratio"]
        ema_flat = torch.cat([e.reshape(-1) for e in ema])
        mean_flat = means.repeat_interleave(counts)
        if corr is not None:
            corr_flat = corr.repeat_interleave(counts)
            ratio = (mean_flat * corr_flat).div_(ema_flat.mul_(corr_flat).add_(eps))
        else:
            ratio = mean_flat.div_(ema_flat.add_(eps))
        above_margin = ratio >= kappa
        keep = above_margin & (u < p_keep)
        if cap > 0:
            ratio.clamp_(max=cap)
        if stats is not None:
            stats["margin"] += int((~above_margin).sum())
            stats["kept"] += int(keep.sum())
            stats["ratio_max"] = max(stats["ratio_max"], float(ratio.max()))
        noise = z.mul_(ratio).mul_(sigma).masked_fill_(keep.logical_not_(), 0)
        torch._foreach_add_(params, [c.view_as(w) for c, w in zip(noise.split(counts.tolist()), params)])

    def _noise_chunked(self, group, params, ema, means, corr, z, u, sigma, stats):
        """One bucket tensor by tensor, chunk by chunk, through reused cache-sized buffers; the values of
        `_noise_flat` bit for bit. The masks are int32 0/1 (bool outputs and masked_fill/where with a
        random mask are several times slower on CPU); the dropped entries are cleared with a bitwise AND
        on the noise bits, which gives exactly masked_fill's +0.0, also where z*ratio is inf or NaN."""
        kappa, p_keep = group["pats_margin"], group["pats_prob"]
        eps, cap = group["pats_eps"], group["pats_max_ratio"]
        size, device = self.cpu_chunk_numel, z.device
        offset = 0
        for j, (w, e) in enumerate(zip(params, ema)):
            w, e = w.view(-1), e.view(-1)
            numerator = means[j] if corr is None else means[j] * corr[j]
            for start in range(0, e.numel(), size):
                stop = min(start + size, e.numel())
                m = stop - start
                ratio = self._scratch(device, "ratio", m)
                keep = self._scratch(device, "keep", m, torch.int32)
                coin = self._scratch(device, "coin", m, torch.int32)
                zc, uc = z[offset + start:offset + stop], u[offset + start:offset + stop]
                if corr is None:
                    torch.add(e[start:stop], eps, out=ratio)
                else:
                    torch.mul(e[start:stop], corr[j], out=ratio).add_(eps)
                torch.div(numerator, ratio, out=ratio)
                torch.ge(ratio, kappa, out=keep)
                if stats is not None:
                    stats["margin"] += m - int(keep.sum())
                keep.bitwise_and_(torch.lt(uc, p_keep, out=coin))
                if cap > 0:
                    ratio.clamp_(max=cap)
                if stats is not None:
                    stats["kept"] += int(keep.sum())
                    stats["ratio_max"] = max(stats["ratio_max"], float(ratio.max()))
                zc.mul_(ratio).mul_(sigma)
                zc.view(torch.int32).bitwise_and_(keep.neg_())  # 1 -> all bits set, 0 -> +0.0
                w[start:stop].add_(zc)
            offset += e.numel()

    # ---------------------------------------------------------------- NoisyTune
    @torch.no_grad()
    def noisytune_(self, noise_lambda: float, selected: Optional[Sequence[torch.Tensor]] = None) -> Dict:
        """W += U(-lambda/2, lambda/2) * std(W) per tensor, once (Wu et al. 2022).

        std is the unbiased std of the whole tensor in fp32; one-element tensors (std undefined) are
        skipped. Uniforms come from a generator seeded from (seed, stream 1), tensor by tensor in
        parameter-group order, so every replica perturbs identically.
        """
        targets = list(selected) if selected is not None else [
            p for g in self.param_groups for p in g["params"]]
        report = {"perturbed": 0, "skipped_single_element": 0}
        if not targets:
            return report
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
