"""fairseq version check and torch>=2.6 `weights_only` checkpoint loading for fairseq checkpoints."""
from __future__ import annotations

import argparse
import collections
import functools
import pickle
import re
import typing

MIN_FAIRSEQ = "0.12.2"
INSTALL_HINT = (
    "install it with `make install`, or by hand: "
    "`pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1` "
    "plus the pins in requirements.txt (see README, 'Install')"
)


def check_fairseq() -> None:
    """Fail early, with the fix, when fairseq is missing or older than the 0.12 line we support."""
    try:
        import fairseq
    except ImportError as err:
        raise ImportError(f"robustft needs fairseq>={MIN_FAIRSEQ}, which is not importable ({err}); "
                          f"{INSTALL_HINT}") from err
    from packaging.version import Version

    version = getattr(fairseq, "__version__", "0")
    if Version(version) < Version(MIN_FAIRSEQ):
        raise ImportError(f"robustft needs fairseq>={MIN_FAIRSEQ}, found {version} at "
                          f"{fairseq.__file__}; {INSTALL_HINT}")


def checkpoint_safe_globals() -> list:
    """Exactly the non-tensor types a fairseq 0.12 checkpoint pickles (cfg, args, optimizer history).

    Found by saving checkpoints of every method and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`; extend this list, never disable
    weights_only.
    """
    import numpy as np
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf.nodes import AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    safe = [
        # every checkpoint: `args` (fairseq/checkpoint_utils.py:340)
        argparse.Namespace,
        # configs broadcast between ranks are pickled DictConfigs (fairseq/distributed/utils.py:805)
        DictConfig, ListConfig, ContainerMetadata, Metadata,
        AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode,
        typing.Any, collections.defaultdict,
        # numpy scalars/dtypes (e.g. a best-metric value) in checkpoints of released models (#5603)
        np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
        np._core.multiarray.scalar,
        # with >1 rank, rank 0 broadcasts the loaded state (fairseq/distributed/utils.py:805-811):
        # the rebuilt DictConfig's metadata references these builtins, and tensors travel separately
        # behind placeholders
        dict, int, list, _TensorPlaceholder,
    ]
    return safe


_REGISTERED = False


def register_checkpoint_safe_globals() -> None:
    """Allow fairseq checkpoints under torch.load(weights_only=True) (torch >= 2.6 default)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(checkpoint_safe_globals())
    _explain_refused_checkpoints()
    _REGISTERED = True


def _explain_refused_checkpoints() -> None:
    """Re-raise torch's refusal of a checkpoint with the file name and safe advice.

    torch's message names no file and suggests `weights_only=False` or allow-listing the offending
    global: the two ways to execute an untrusted file. fairseq's trainer and loaders call
    `checkpoint_utils.load_checkpoint_to_cpu` through the module attribute, so wrapping it covers them.
    """
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_robustft_explains_refusal", False):
        return

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = found.group(1) if found else "an object torch's weights_only loader refuses"
            raise pickle.UnpicklingError(
                f"refusing to load checkpoint {path}: it pickles {what}, which is not part of a "
                f"fairseq checkpoint. robustft loads checkpoints with torch weights_only=True and the "
                f"allow-list in robustft_common/compat.py. If this is a genuine checkpoint of another "
                f"fairseq version, report that global so the list can be extended; do not disable "
                f"weights_only or allow-list it for a file you did not produce.") from None
    load_checkpoint_to_cpu._robustft_explains_refusal = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
