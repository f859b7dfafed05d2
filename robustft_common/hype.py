"""HyPe hidden-representation perturbation, shared by every criterion that composes with it.

STUB owned by the HyPe work (issue 5): the config is final in shape; `attach_hype` is implemented there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass


@dataclass
class HypeConfig(FairseqDataclass):
    hype_type: ChoiceEnum(["none", "normal", "uniform"]) = field(
        default="none", metadata={"help": "HyPe noise on every Transformer layer's input: none (off), "
                                          "normal N(0, eps^2), uniform U(-eps, eps)"})
    hype_eps: float = field(default=1e-5, metadata={"help": "HyPe noise scale"})


def attach_hype(model, cfg) -> None:
    """Install HyPe on `model` once (idempotent); a no-op when cfg.hype_type == 'none'."""
    if getattr(cfg, "hype_type", "none") != "none":
        raise NotImplementedError("HyPe is not implemented yet")
