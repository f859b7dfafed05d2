"""Generic helpers shared by every method: no method knowledge, nothing registered, no fairseq patched."""

from __future__ import annotations

import torch
from fairseq.logging import metrics
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside fairseq's data-parallel wrappers (ModuleProxyWrapper -> DDP -> model)."""
    while isinstance(inner := getattr(model, "module", None), nn.Module):
        model = inner
    return model


def run_setting(model_args, attr: str, config_path: str):
    """A setting of the run outside the model's own config, as `task.build_model(cfg.model)` sees it
    (None when it cannot be seen).

    fairseq-train hands a legacy model the whole argparse namespace, other components' flags included
    (attribute `attr`, e.g. `mixout_p`); hydra (fairseq_cli/hydra_train.py) and dataclass models get only
    the `model:` node of the run's config (fairseq_cli/train.py:96), whose parent holds `config_path`
    (e.g. `criterion.mixout_p`). The same holds for a model rebuilt from a checkpoint's config
    (checkpoint_utils.load_model_ensemble_and_task). A node detached from its config has no parent.
    """
    value = getattr(model_args, attr, None)
    if value is None and OmegaConf.is_config(model_args):
        try:
            value = OmegaConf.select(model_args, f"..{config_path}", default=None)
        except OmegaConfBaseException:  # a node without a parent
            value = None
    return value


def logged_sum(logging_outputs, key: str) -> float:
    """Sum of `key` over fairseq logging outputs (tensors or numbers; missing = 0), as a float."""
    return sum(_item(log.get(key, 0)) for log in logging_outputs)


def _item(value) -> float:
    return value.item() if torch.is_tensor(value) else float(value)


def log_ratio_pairs(logging_outputs) -> None:
    """Log every `<name>_num` / `<name>_den` pair as the ratio `<name>` (e.g. `*_noise_effective`).

    Summing numerators and denominators first keeps the ratio right across batches and workers; a pair
    whose denominator sums to 0 (e.g. noise counts of an eval pass, which adds no noise) is not logged.
    """
    keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()
    for key in sorted(k for k in keys if k.endswith("_num")):
        name = key[: -len("_num")]
        den = logged_sum(logging_outputs, f"{name}_den")
        if den > 0:
            metrics.log_scalar(name, logged_sum(logging_outputs, key) / den, den, round=4)
