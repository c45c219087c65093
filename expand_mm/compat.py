"""Compatibility fixes for running the OpenMMLab 2.x stack on torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``. mmengine 0.10.7
writes a few non-tensor objects into its checkpoints (the message hub's
``HistoryBuffer`` holding numpy arrays), so its own ``resume`` fails with an
``UnpicklingError``. Rather than switching safe loading off, we allowlist exactly
those types; any other pickled object is still refused by torch.

One of them needs more than an allowlist: a pickled ``HistoryBuffer`` carries
its statistics methods, stored as ``getattr(HistoryBuffer, 'mean')``, and
allowlisting ``getattr`` would let a checkpoint reach any attribute of any
allowed object. So we also register a reducer that pickles a ``HistoryBuffer``
by its data alone (log history, count history, max length); it is rebuilt
through its constructor, which restores the default statistics methods.
"""
from __future__ import annotations

import copyreg
from collections.abc import Mapping
from typing import Any

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


def _reduce_history_buffer(buffer):
    """Pickle a ``HistoryBuffer`` as ``HistoryBuffer(log, count, max_length)``."""
    log_history, count_history = buffer.data
    return type(buffer), (log_history, count_history, buffer.max_length)


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints.

    Checkpoints written while expand_mm is imported load safely; older ones
    written by plain mmengine hold ``getattr`` references and are still refused
    (torch's error names the global). Idempotent. No effect on torch versions
    without safe globals.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # pragma: no cover - torch < 2.4
        return
    try:
        import mmengine  # noqa: F401
    except ImportError:  # the layers and surgery work without mmengine
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    add_safe_globals(mmengine_checkpoint_globals())


def type_name(type_: Any) -> str:
    """The bare name of a config ``type``: a registry string (``'mmdet.AdamW'``) or a class."""
    name = type_ if isinstance(type_, str) else getattr(type_, '__name__', '')
    return name.split('.')[-1]


def plain_builtins(value: Any) -> Any:
    """A copy of ``value`` with every mapping a plain ``dict``, every sequence a list / tuple.

    For what expand_mm writes into a checkpoint's ``meta``. Config files hand
    hooks mmengine ``ConfigDict`` objects, which are not among the globals
    ``torch.load(weights_only=True)`` (the default from torch 2.6) accepts: one
    of them in ``meta`` makes the whole checkpoint unreadable, for ``--resume``
    as for every tool. A class or function (``dict(type=nn.LeakyReLU)`` in a
    pure-Python config) becomes its ``module.qualname`` string; other leaves
    (str, int, float, bool, None, tensors) are kept as they are.
    """
    if isinstance(value, Mapping):
        return {key: plain_builtins(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(plain_builtins(item) for item in value)
    if isinstance(value, list):
        return [plain_builtins(item) for item in value]
    if isinstance(value, type) or callable(value) and not isinstance(value, torch.Tensor):
        # A pure-Python config's dict(type=nn.LeakyReLU): its importable name.
        return f'{getattr(value, "__module__", "?")}.{getattr(value, "__qualname__", value)}'
    return value


def patch_mmdet_ssd_head() -> None:
    """Let mmdet 3.3.0's ``SSDHead`` predict (open upstream bug, mmdet#11780).

    ``BaseDenseHead._predict_by_feat_single`` reads ``self.loss_cls``, which
    ``SSDHead`` never creates, so every SSD / SSDLite validation, test and
    ``inference_detector`` call fails with ``AttributeError``. A class-level
    ``loss_cls = None`` makes that check fall through to the sigmoid/softmax
    branch SSD always used. Only applied when the attribute is missing.
    """
    try:
        from mmdet.models.dense_heads import SSDHead
    except ImportError:
        return
    if not hasattr(SSDHead, 'loss_cls') and 'loss_cls' not in SSDHead.__init__.__code__.co_names:
        SSDHead.loss_cls = None
