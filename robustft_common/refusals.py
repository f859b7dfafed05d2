"""Flags of a method that a component refuses to run with, accepted by the parser so that the run stops
with the registry's reason instead of argparse's bare "unrecognized arguments".

`robustft_common.methods.COMBINATIONS` says which pairs of methods do not run together and why (e.g. R-Drop
+ R3F: two two-pass consistency criterions, one `--criterion` per run). Where the second method's flags
belong to another criterion or optimizer, fairseq's parser would only print `unrecognized arguments:
--r3f-lambda 0.7`. A component that refuses a method includes that method's `Refused*Flags` dataclass in
its config (its flags then parse, default None = not given) and calls `check_refused` in `__init__`, which
stops the run at startup naming the flag, both methods and the reason.
"""

from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass

from robustft_common.methods import COMBINATIONS, get_method

_HELP = "refused here (not a supported combination): the run stops at startup and says why"


def _refused(flag: str):
    return field(default=None, metadata={"help": f"{flag} of another method: {_HELP}"})


@dataclass
class RefusedR3FFlags(FairseqDataclass):
    """R3F's criterion flags (rxf_src/sentence_prediction_r3f.py) on another consistency criterion."""

    METHOD = "r3f"  # the registry method these flags belong to (not annotated: fairseq would make it a flag)
    r3f_lambda: Optional[str] = _refused("--r3f-lambda")
    eps: Optional[str] = _refused("--eps")
    noise_type: Optional[str] = _refused("--noise-type")


@dataclass
class RefusedNeftuneFlags(FairseqDataclass):
    """NEFTune's flags (baselines_src/neftune.py) on a criterion that noises the same embeddings."""

    METHOD = "neftune"
    neftune_alpha: Optional[str] = _refused("--neftune-alpha")
    neftune_length: Optional[str] = _refused("--neftune-length")


@dataclass
class RefusedChildTuningFlags(FairseqDataclass):
    """ChildTuning's optimizer flags (baselines_src/childtuning.py) on an optimizer without a child network."""

    METHOD = "childtuning_d"
    childtuning_mode: Optional[str] = _refused("--childtuning-mode")
    childtuning_reserve_p: Optional[str] = _refused("--childtuning-reserve-p")
    childtuning_param_include: Optional[str] = _refused("--childtuning-param-include")
    childtuning_param_exclude: Optional[str] = _refused("--childtuning-param-exclude")
    childtuning_fisher_clip: Optional[str] = _refused("--childtuning-fisher-clip")


def _combination(a: str, b: str):
    for combination in COMBINATIONS.values():
        if set(combination.methods) == {a, b} and combination.refused_by is not None:
            return combination
    raise KeyError(f"robustft_common.methods.COMBINATIONS has no refused pair {a} + {b}")


def check_refused(cfg, own: str, *refused: type[FairseqDataclass]) -> None:
    """Stop if `cfg` carries a flag of a refused method (one of the `Refused*Flags` classes its config
    includes); `own` is the registry method of the component that refuses it."""
    for flags in refused:
        own_fields = [f.name for f in fields(flags) if not f.name.startswith("_")]  # not FairseqDataclass._name
        given = [name for name in own_fields if getattr(cfg, name, None) is not None]
        if not given:
            continue
        other: str = flags.METHOD
        combination = _combination(own, other)
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(
            f"{names}: {get_method(own).label} and {get_method(other).label} do not run together in one "
            f"fairseq-train ({combination.why}); drop {names} or choose the other method's component. "
            "Pairs that do: `python -m robustft_common.methods combinations`"
        )
