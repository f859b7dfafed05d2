"""Flags of a method that a component refuses to run with, accepted by the parser so that the run stops
with the registry's reason instead of argparse's bare "unrecognized arguments".

`robustft_common.methods.COMBINATIONS` says which pairs of methods do not run together and why (e.g. R-Drop
+ R3F: two two-pass consistency criterions, one `--criterion` per run). Where the second method's flags
belong to another criterion or optimizer, fairseq's parser would only print `unrecognized arguments:
--r3f-lambda 0.7`. A component that refuses a method includes that method's `Refused*Flags` dataclass in
its config (its flags then parse, default None = not given) and calls `check_refused` in `__init__`, which
stops the run at startup naming the flag, both methods and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from fairseq.dataclass import FairseqDataclass

from robustft_common.methods import COMBINATIONS, get_method

_HELP = "refused here (not a supported combination): the run stops at startup and says why"


def _refused(flag: str):
    return field(default=None, metadata={"help": f"{flag} of another method: {_HELP}"})


@dataclass
class RefusedR3FFlags(FairseqDataclass):
    """R3F's criterion flags (rxf_src/sentence_prediction_r3f.py) on another consistency criterion."""

    METHOD: ClassVar[str] = "r3f"
    r3f_lambda: str | None = _refused("--r3f-lambda")
    eps: str | None = _refused("--eps")
    noise_type: str | None = _refused("--noise-type")


@dataclass
class RefusedNeftuneFlags(FairseqDataclass):
    """NEFTune's flags (baselines_src/neftune.py) on a criterion that noises the same embeddings."""

    METHOD: ClassVar[str] = "neftune"
    neftune_alpha: str | None = _refused("--neftune-alpha")
    neftune_length: str | None = _refused("--neftune-length")


@dataclass
class RefusedChildTuningFlags(FairseqDataclass):
    """ChildTuning's optimizer flags (baselines_src/childtuning.py) on an optimizer without a child network."""

    METHOD: ClassVar[str] = "childtuning_d"
    childtuning_mode: str | None = _refused("--childtuning-mode")
    childtuning_reserve_p: str | None = _refused("--childtuning-reserve-p")
    childtuning_param_include: str | None = _refused("--childtuning-param-include")
    childtuning_param_exclude: str | None = _refused("--childtuning-param-exclude")
    childtuning_fisher_clip: str | None = _refused("--childtuning-fisher-clip")


def _combination(a: str, b: str):
    for combination in COMBINATIONS.values():
        if set(combination.methods) == {a, b} and combination.refused_by is not None:
            return combination
    raise KeyError(f"robustft_common.methods.COMBINATIONS has no refused pair {a} + {b}")


def check_refused(cfg, own: str, *refused: type[FairseqDataclass]) -> None:
    """Stop if `cfg` carries a flag of a refused method (one of the `Refused*Flags` classes its config
    includes); `own` is the registry method of the component that refuses it."""
    for flags in refused:
        given = [f.name for f in fields(flags) if getattr(cfg, f.name, None) is not None]
        if not given:
            continue
        other: str = flags.METHOD  # type: ignore[attr-defined]
        combination = _combination(own, other)
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(
            f"{names}: {get_method(own).label} and {get_method(other).label} do not run together in one "
            f"fairseq-train ({combination.why}); drop {names} or choose the other method's component. "
            "Pairs that do: `python -m robustft_common.methods combinations`"
        )
