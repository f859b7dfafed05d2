"""fairseq version check, and the types fairseq checkpoints may pickle under torch>=2.6 `weights_only` loading
(registered by `fairseq_patches.allow_checkpoint_globals`)."""

from __future__ import annotations

import argparse
import collections
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
        raise ImportError(
            f"robustft needs fairseq>={MIN_FAIRSEQ}, which is not importable ({err}); {INSTALL_HINT}"
        ) from err
    from packaging.version import Version

    version = getattr(fairseq, "__version__", "0")
    if Version(version) < Version(MIN_FAIRSEQ):
        raise ImportError(
            f"robustft needs fairseq>={MIN_FAIRSEQ}, found {version} at {fairseq.__file__}; {INSTALL_HINT}"
        )


def checkpoint_safe_globals() -> list:
    """Exactly the non-tensor types a fairseq 0.12 checkpoint pickles (cfg, args, optimizer history).

    Found by saving checkpoints of every method and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`; extend this list, never disable
    weights_only.
    """
    import numpy as np
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    safe = [
        # every checkpoint: `args` (fairseq/checkpoint_utils.py:340)
        argparse.Namespace,
        # configs broadcast between ranks are pickled DictConfigs (fairseq/distributed/utils.py:805)
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        EnumNode,
        FloatNode,
        IntegerNode,
        StringNode,
        typing.Any,
        collections.defaultdict,
        # numpy scalars/dtypes (e.g. a best-metric value) in checkpoints of released models (#5603)
        np.dtype,
        np.dtypes.Float64DType,
        np.dtypes.Float32DType,
        np.dtypes.Int64DType,
        np._core.multiarray.scalar,  # type: ignore[attr-defined]  # private module, absent from numpy's stubs
        # with >1 rank, rank 0 broadcasts the loaded state (fairseq/distributed/utils.py:805-811):
        # the rebuilt DictConfig's metadata references these builtins, and tensors travel separately
        # behind placeholders
        dict,
        int,
        list,
        _TensorPlaceholder,
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
    _REGISTERED = True
