"""Compatibility fixes for running the OpenMMLab 2.x stack on torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``. mmengine 0.10.7
writes a few non-tensor objects into its checkpoints (the message hub's
``HistoryBuffer`` holding numpy arrays), so its own ``resume`` fails with an
``UnpicklingError``. Rather than switching safe loading off, we allowlist exactly
those types; any other pickled object is still refused by torch.
"""
from __future__ import annotations

import numpy as np
import torch


def mmengine_checkpoint_globals() -> list:
    """The non-tensor types mmengine 0.10.x pickles into its checkpoints.

    Returns:
        Classes and functions to pass to ``torch.serialization.add_safe_globals``:
        mmengine's ``HistoryBuffer`` and the numpy machinery needed to rebuild
        the arrays and scalars it holds.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2 moved the pickling helpers to numpy._core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in (
        np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.bool_)]
    return [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints.

    Idempotent. Has no effect on torch versions without safe globals.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # pragma: no cover - torch < 2.4
        return
    try:
        import mmengine  # noqa: F401
    except ImportError:  # the layers and surgery work without mmengine
        return
    add_safe_globals(mmengine_checkpoint_globals())
