"""fairseq optimizers `adamax_pats` (PATS) and `adamax_sage` (SAGE), both with optional NoisyTune.

Flags shared with fairseq's own `adamax` (`--adamax-betas`, `--adamax-eps`, `--weight-decay`,
`--no-bias-correction`) have the same names, defaults and meaning; method flags are prefixed.
See pats_src/README.md for every flag and each reconstructed choice.
"""

import ast
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II

from pats_src.pats_adamax import PatsAdamax
from pats_src.sage_adamax import SageAdamax
from robustft_common import param_filters
from robustft_common.refusals import RefusedChildTuningFlags, check_refused
from robustft_common.validation import require, require_finite_nonnegative, require_positive, require_probability

logger = logging.getLogger(__name__)


@dataclass
class AdamaxConfig(FairseqDataclass):
    """fairseq's `adamax` flags (fairseq/optim/adamax.py:18-29 `add_args`, a legacy optimizer without a config
    class) as a config: same names, defaults and meaning. Also the base of `adamax_childtuning`."""

    adamax_betas: Any = field(default="(0.9, 0.999)", metadata={"help": "betas of Adamax (as fairseq's adamax)"})
    adamax_eps: float = field(default=1e-8, metadata={"help": "epsilon of Adamax (as fairseq's adamax)"})
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "decoupled weight decay theta -= lr*wd*theta (as fairseq's adamax), on every tensor "
            "except those matching --weight-decay-exclude (PATS, SAGE)"
        },
    )
    no_bias_correction: bool = field(
        default=False,
        metadata={"help": "disable Adamax first-moment bias correction (as fairseq's adamax; SAGE's code has none)"},
    )
    lr: List[float] = II("optimization.lr")


@dataclass
class AdamaxNoisyTuneConfig(AdamaxConfig):
    weight_decay_exclude: str = field(
        default=param_filters.NOTHING,
        metadata={
            "help": "regex (re.search on parameter names) of tensors without weight decay; '' = none, as "
            "fairseq's adamax. SAGE's code exempts biases and LayerNorm: "
            "robustft_common.param_filters.NO_DECAY"
        },
    )
    noisytune_lambda: float = field(
        default=0.0,
        metadata={
            "help": "NoisyTune: once before fine-tuning W += U(-l/2, l/2)*std(W) (paper: 0.15); 0 = off. "
            "Needs a pretrained start (--finetune-from-model or --restore-file); never on resume"
        },
    )
    noisytune_param_include: str = field(
        default=param_filters.ALL,
        metadata={"help": "regex (re.search on parameter names) of tensors NoisyTune perturbs"},
    )
    noisytune_param_exclude: str = field(
        default=param_filters.NOTHING, metadata={"help": "regex of tensors NoisyTune leaves alone ('' = none)"}
    )
    # same meaning as the global options: interpolated, not flags
    seed: int = II("common.seed")
    restore_file: str = II("checkpoint.restore_file")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    save_dir: str = II("checkpoint.save_dir")


@dataclass
class AdamaxPatsConfig(AdamaxNoisyTuneConfig, RefusedChildTuningFlags):
    pats_noise: float = field(default=1e-6, metadata={"help": "PATS base noise std sigma; 0 = plain Adamax"})
    pats_beta: float = field(default=0.75, metadata={"help": "EMA decay beta of the sensitivity |theta*g|"})
    pats_margin: float = field(
        default=5e-3,
        metadata={"help": "kappa: no noise where sbar_W/(sbar_j+eps) < kappa (very sensitive entries); 0 = no margin"},
    )
    pats_eps: float = field(default=1e-12, metadata={"help": "epsilon in sigma*sbar_W/(sbar_j+eps)"})
    pats_prob: float = field(default=0.5, metadata={"help": "Bernoulli probability that an entry gets noise"})
    pats_noise_lr_scaled: bool = field(
        default=False, metadata={"help": "multiply the noise by the current learning rate (reconstruction switch)"}
    )
    pats_ema_bias_correction: bool = field(
        default=False, metadata={"help": "bias-correct the sensitivity EMA by 1/(1-beta^t) (reconstruction switch)"}
    )
    pats_max_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "cap on rho = sbar_W/(sbar_j+eps), i.e. noise std <= cap*sigma; default 1/--pats-margin "
            "(no cap without a margin); 0 = uncapped, as in the paper"
        },
    )
    pats_param_include: str = field(
        default=param_filters.ENCODER_LAYERS,
        metadata={"help": "regex (re.search on parameter names) of tensors PATS perturbs"},
    )
    pats_param_exclude: str = field(
        default=param_filters.LAYER_NORM, metadata={"help": "regex of tensors PATS leaves alone (default: LayerNorm)"}
    )
    pats_log_stats: bool = field(
        default=False,
        metadata={
            "help": "log the noise every update: pats_frac_noised, pats_frac_zeroed_by_margin, pats_ratio_max, "
            "pats_frac_ratio_ge_1e<k>, pats_noise_max, pats_kick_max, pats_frac_kick_ge_<x> "
            "(kick = |noise|/|theta|); --log-interval 1 for per-update values"
        },
    )


@dataclass
class AdamaxSageConfig(AdamaxNoisyTuneConfig):
    sage_beta3: float = field(default=0.75, metadata={"help": "SAGE sensitivity EMA decay beta3"})
    sage_eps: float = field(default=1e-12, metadata={"help": "SAGE guard e^2 in |I-Ibar|/(Ibar+e^2)"})
    sage_param_include: str = field(
        default=param_filters.ENCODER_LAYERS,
        metadata={"help": "regex (re.search on parameter names) of tensors with SAGE learning rates"},
    )
    sage_param_exclude: str = field(
        default=param_filters.LAYER_NORM,
        metadata={"help": "regex of tensors that keep plain Adamax (default: LayerNorm)"},
    )


def parse_betas(flag: str, value) -> tuple:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{flag}: expected a pair like '(0.9, 0.999)', got {value!r}") from err
    betas = tuple(float(b) for b in value)
    require(
        len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), flag, f"expected two numbers in [0, 1), got {value!r}"
    )
    return betas


def start_kind(restore_file: Optional[str], finetune_from_model: Optional[str], save_dir: str) -> str:
    """'resume' | 'pretrained' | 'scratch', mirroring fairseq's checkpoint_utils.load_checkpoint."""
    if restore_file in (None, "checkpoint_last.pt"):
        if os.path.exists(os.path.join(save_dir or ".", "checkpoint_last.pt")):
            return "resume"
        return "pretrained" if finetune_from_model else "scratch"
    return "pretrained"


class _SensitivityAdamaxOptimizer(FairseqOptimizer):
    torch_optimizer: type  # the SensitivityAdamax subclass this wraps (set by each subclass)
    prefix = ""

    @classmethod
    def check_trainer_config(cls, cfg) -> None:
        """Refuse flat --fp16 before fairseq builds its fp16 wrapper (called by fairseq_patches): its one flat
        fp32 buffer has no per-tensor names or means, and on CPU fairseq would stop first with a CUDA assertion
        (FP16Optimizer.build_fp32_params calls torch.cuda.current_device(), fp16_optimizer.py:38)."""
        common = cfg.common
        mixed = common.bf16 or common.amp or common.memory_efficient_fp16 or common.memory_efficient_bf16
        if common.fp16 and not mixed and not common.fp16_no_flatten_grads:
            raise ValueError(
                f"--optimizer {cfg.optimizer._name}: --fp16 flattens all parameters into one fp32 buffer, which "
                f"has no per-tensor names or means for --{cls.prefix}-*; add --fp16-no-flatten-grads or use "
                "--memory-efficient-fp16"
            )

    def __init__(self, cfg, params):
        super().__init__(cfg)
        params = list(params)
        self._validate(cfg)
        names = param_filters.names_for_params(params)
        sensitive = self._select(
            names,
            params,
            f"--{self.prefix}-param-include",
            f"--{self.prefix}-param-exclude",
            getattr(cfg, f"{self.prefix}_param_include"),
            getattr(cfg, f"{self.prefix}_param_exclude"),
            needed=self._extras_active(cfg),
        )
        no_decay = self._no_weight_decay(names, params, cfg.weight_decay_exclude)
        self._noisytune_targets = []
        if cfg.noisytune_lambda > 0:
            kind = start_kind(
                getattr(cfg, "restore_file", None),
                getattr(cfg, "finetune_from_model", None),
                getattr(cfg, "save_dir", "."),
            )
            require(
                kind != "scratch",
                "--noisytune-lambda",
                "NoisyTune perturbs a pretrained model once before fine-tuning; pass "
                "--finetune-from-model PATH or --restore-file PATH, or set it to 0",
            )
            mask = self._select(
                names,
                params,
                "--noisytune-param-include",
                "--noisytune-param-exclude",
                cfg.noisytune_param_include,
                cfg.noisytune_param_exclude,
                needed=True,
            )
            self._noisytune_targets = [p for p, m in zip(params, mask) if m]
            self._start_kind = kind
        if names is not None and any(sensitive):
            logger.info(
                f"{self.prefix}: {sum(sensitive)} of {len(params)} tensors selected, e.g. "
                f"{[n for n, s in zip(names, sensitive) if s][:3]}"
            )
        self._optimizer = self.torch_optimizer(
            params, sensitive, no_decay, seed=int(getattr(cfg, "seed", 1) or 1), **self.optimizer_config
        )

    # ------------------------------------------------------------ config
    def _extras_active(self, cfg) -> bool:
        raise NotImplementedError

    def _validate(self, cfg):
        parse_betas("--adamax-betas", cfg.adamax_betas)
        require_finite_nonnegative("--adamax-eps", cfg.adamax_eps)
        require_finite_nonnegative("--weight-decay", cfg.weight_decay)
        require_finite_nonnegative("--noisytune-lambda", cfg.noisytune_lambda)

    @staticmethod
    def _select(names, params, include_flag, exclude_flag, include, exclude, needed):
        if names is None:
            if not needed:
                return [False] * len(params)
            raise ValueError(
                f"{include_flag}: cannot map the optimizer's {len(params)} tensor(s) to parameter "
                "names. Under --fp16 add --fp16-no-flatten-grads (one flat fp32 buffer has no "
                "per-tensor names or means) or use --memory-efficient-fp16; outside fairseq-train "
                "call robustft_common.param_filters.tag_parameter_names(model) first"
            )
        return param_filters.select(names, include, exclude, include_flag, exclude_flag)

    @staticmethod
    def _no_weight_decay(names, params, pattern: str):
        """--weight-decay-exclude as a mask; like the other filters, one that matches nothing is an error."""
        flag = "--weight-decay-exclude"
        regex = param_filters.compile_pattern(flag, pattern)
        if regex is None:
            return None
        if names is None:
            raise ValueError(
                f"{flag}: cannot map the optimizer's {len(params)} tensor(s) to parameter names. Under "
                "--fp16 add --fp16-no-flatten-grads or use --memory-efficient-fp16; outside fairseq-train "
                "call robustft_common.param_filters.tag_parameter_names(model) first"
            )
        mask = [bool(regex.search(n)) for n in names]
        if not any(mask):
            raise ValueError(
                f"{flag} {pattern!r} matches no parameter; fix the regex. Parameter names "
                f"look like: {', '.join(names[:6])}, ..."
            )
        logger.info(
            f"weight decay off for {sum(mask)} of {len(params)} tensors ({flag}), e.g. "
            f"{[n for n, m in zip(names, mask) if m][:3]}"
        )
        return mask

    @property
    def optimizer_config(self):
        cfg = self.cfg
        return {
            "lr": cfg.lr[0],
            "betas": parse_betas("--adamax-betas", cfg.adamax_betas),
            "eps": cfg.adamax_eps,
            "weight_decay": cfg.weight_decay,
            "bias_correction": not cfg.no_bias_correction,
            **self._method_config(),
        }

    def _method_config(self) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------ NoisyTune hook
    def _maybe_noisytune(self):
        """Once, at the first zero_grad (start of the first train step: before any forward), or at the
        first step under --fp16 (FP16Optimizer never calls the inner zero_grad). A checkpoint's
        optimizer state carries the marker, so a resumed run never perturbs again."""
        opt = self._optimizer
        if opt.global_state["noisytune_done"]:
            return
        opt.global_state["noisytune_done"] = True
        if not self._noisytune_targets:
            return
        if opt.global_state["updates"] > 0 or self._start_kind == "resume":
            logger.warning(
                "NoisyTune skipped: this run resumes training (optimizer state without "
                "the NoisyTune marker, e.g. --reset-optimizer); it is applied only once"
            )
            return
        report = opt.noisytune_(self.cfg.noisytune_lambda, self._noisytune_targets)
        logger.info(
            f"NoisyTune applied (lambda={self.cfg.noisytune_lambda}): "
            f"{report['perturbed']} tensors perturbed, "
            f"{report['skipped_single_element']} one-element tensors skipped"
        )

    def zero_grad(self):
        self._maybe_noisytune()
        super().zero_grad()

    def step(self, closure=None, scale=1.0, groups=None):
        self._maybe_noisytune()
        super().step(closure, scale=scale, groups=groups)
        for key, value in self._optimizer.last_stats.items():
            metrics.log_scalar(key, value)  # unrounded: fractions of 1e-7 of the entries matter


@register_optimizer("adamax_pats", dataclass=AdamaxPatsConfig)
class FairseqAdamaxPats(_SensitivityAdamaxOptimizer):
    """fairseq's Adamax + PATS sensitivity-aware parameter noise (Zhang et al., EMNLP 2022)."""

    torch_optimizer = PatsAdamax
    prefix = "pats"

    def _extras_active(self, cfg):
        return cfg.pats_noise > 0

    def _validate(self, cfg):
        super()._validate(cfg)
        check_refused(cfg, "pats", RefusedChildTuningFlags)
        require_finite_nonnegative("--pats-noise", cfg.pats_noise)
        require(0.0 <= cfg.pats_beta < 1.0, "--pats-beta", f"must be in [0, 1), got {cfg.pats_beta!r}")
        require_finite_nonnegative("--pats-margin", cfg.pats_margin)
        require_positive("--pats-eps", cfg.pats_eps)  # finite: inf would silently turn the noise off
        require_probability("--pats-prob", cfg.pats_prob)
        if cfg.pats_max_ratio is not None:
            require_finite_nonnegative("--pats-max-ratio", cfg.pats_max_ratio)

    def _method_config(self):
        cfg = self.cfg
        return dict(
            pats_noise=cfg.pats_noise,
            pats_beta=cfg.pats_beta,
            pats_margin=cfg.pats_margin,
            pats_eps=cfg.pats_eps,
            pats_prob=cfg.pats_prob,
            pats_noise_lr_scaled=cfg.pats_noise_lr_scaled,
            pats_ema_bias_correction=cfg.pats_ema_bias_correction,
            pats_max_ratio=cfg.pats_max_ratio,
            log_stats=cfg.pats_log_stats,
        )


@register_optimizer("adamax_sage", dataclass=AdamaxSageConfig)
class FairseqAdamaxSage(_SensitivityAdamaxOptimizer):
    """fairseq's Adamax with SAGE sensitivity-guided element-wise learning rates (Liang et al., 2022)."""

    torch_optimizer = SageAdamax
    prefix = "sage"

    def _extras_active(self, cfg):
        return True

    def _validate(self, cfg):
        super()._validate(cfg)
        require(0.0 <= cfg.sage_beta3 < 1.0, "--sage-beta3", f"must be in [0, 1), got {cfg.sage_beta3!r}")
        require_positive("--sage-eps", cfg.sage_eps)  # finite: inf would silently freeze selected params

    def _method_config(self):
        return dict(sage_beta3=self.cfg.sage_beta3, sage_eps=self.cfg.sage_eps)
