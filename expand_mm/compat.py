"""Compatibility and safety fixes for running the OpenMMLab 2.x stack on torch >= 2.6.

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

mmengine's checkpoint loaders call ``torch.load`` without ``weights_only``, so
torch's opt-out variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns every
checkpoint they read (resume, auto-resume, ``load_from``, a ``Pretrained``
``init_cfg``, a remote teacher) into a pickle that can run any code; its
download loaders pass ``weights_only=False`` outright. :func:`make_checkpoint_loading_safe`
wraps every loader of mmengine's ``CheckpointLoader`` so that it loads weights
only whatever the caller or the environment says, and warns loudly when the
variable is set.
"""
from __future__ import annotations

import contextlib
import copyreg
import functools
import logging
import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator

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


def refuse_amp_without_accelerator() -> None:
    """Let a config's ``AmpOptimWrapper`` on a machine without an accelerator end in one line.

    mmengine asserts inside ``AmpOptimWrapper.__init__`` that CUDA, an NPU, an
    MLU or a MUSA device is there; the optimizer wrapper is built in
    ``runner.train()`` before any hook runs, so the bare ``AssertionError``
    reaches the user as a traceback. The same test, made first, raises
    :class:`~expand_mm.errors.ConfigError` saying what to set instead.
    Idempotent; nothing changes where mmengine is missing.
    """
    try:
        from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                                     is_npu_available)
        from mmengine.optim import AmpOptimWrapper
    except ImportError:
        return
    from .errors import ConfigError
    init = AmpOptimWrapper.__init__
    if getattr(init, 'refuses_cpu', False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if not (is_cuda_available() or is_npu_available() or is_mlu_available()
                or is_musa_available()):
            raise ConfigError(
                "optim_wrapper.type='AmpOptimWrapper' (automatic mixed precision) needs a CUDA "
                'GPU (or an NPU / MLU / MUSA device), and this machine has none: train in '
                "float32 with optim_wrapper.type='OptimWrapper' (--cfg-options "
                'optim_wrapper.type=OptimWrapper), without the loss_scale / dtype keys that '
                'only AmpOptimWrapper takes')
        init(self, *args, **kwargs)

    __init__.refuses_cpu = True
    AmpOptimWrapper.__init__ = __init__


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


#: torch's opt-out of weights-only loading (honoured where a caller does not pass
#: ``weights_only``), and its switch that forces weights-only loading for every call.
UNSAFE_LOAD_ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'
FORCE_SAFE_LOAD_ENV = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'
_TORCH_TRUE_VALUES = ('1', 'y', 'yes', 'true')  # what torch.load reads as "set"


def unsafe_loading_requested() -> bool:
    """Whether ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set, as ``torch.load`` reads it."""
    return os.environ.get(UNSAFE_LOAD_ENV, '0').lower() in _TORCH_TRUE_VALUES


def unsafe_loading_warning() -> str:
    """What the opt-out variable does and what expand_mm does about it."""
    return (f'{UNSAFE_LOAD_ENV} is set: torch.load would unpickle any object a checkpoint '
            'holds, which can run arbitrary code. expand_mm loads checkpoints (its own reads '
            "and every loader of mmengine's CheckpointLoader: resume, auto-resume, load_from, "
            "Pretrained init_cfg, a distiller's teacher) with weights_only=True regardless and "
            'refuses other content; any other torch.load in this process is unprotected. '
            f'Unset {UNSAFE_LOAD_ENV}; re-save a checkpoint that needs it as a plain state_dict '
            'where it was made')


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` in the block loads weights only, whatever it is asked.

    Sets torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (which wins over an explicit
    ``weights_only=False``) and clears ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    (torch refuses both at once) for the block, then restores both.
    """
    saved = {name: os.environ.get(name) for name in (FORCE_SAFE_LOAD_ENV, UNSAFE_LOAD_ENV)}
    os.environ[FORCE_SAFE_LOAD_ENV] = '1'
    os.environ.pop(UNSAFE_LOAD_ENV, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _weights_only_loader(loader: Callable) -> Callable:
    """``loader`` (one of mmengine's scheme loaders) loading weights only.

    A file that weights-only loading refuses raises
    :class:`~expand_mm.checkpoint.CheckpointError` naming torch's reason (the
    refused global), without torch's advice to load it unsafely.
    """
    @functools.wraps(loader)  # mmengine logs the loader by its __name__
    def load(filename, *args, **kwargs):
        from .checkpoint import unreadable_checkpoint_error
        if unsafe_loading_requested():
            from mmengine.logging import print_log
            print_log(f'{unsafe_loading_warning()} (loading {filename})', logger='current',
                      level=logging.WARNING)
        with weights_only_loading():
            try:
                return loader(filename, *args, **kwargs)
            except pickle.UnpicklingError as err:
                raise unreadable_checkpoint_error(filename, err) from err

    load.weights_only = True
    return load


def guard_checkpoint_loaders() -> None:
    """Make every scheme loader of mmengine's ``CheckpointLoader`` load weights only.

    Covers whatever loads through it: ``Runner.load_checkpoint`` / ``resume``
    (``load_from``, ``resume``, the work dir's ``last_checkpoint``),
    ``load_checkpoint`` (``Pretrained`` ``init_cfg``, a remote teacher, mmdet's
    ``init_detector``, mmseg's ``init_model``), local files and URLs alike.
    Idempotent; a scheme registered later is wrapped by the next call.
    """
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:  # the layers and surgery work without mmengine
        return
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, 'weights_only', False):
            CheckpointLoader.register_scheme(prefix, _weights_only_loader(loader), force=True)


def make_checkpoint_loading_safe() -> None:
    """Guard mmengine's checkpoint loaders and warn when torch's opt-out is set.

    See :func:`guard_checkpoint_loaders`; the warning (:func:`unsafe_loading_warning`)
    is repeated before each checkpoint loaded while the variable is set.
    """
    guard_checkpoint_loaders()
    if unsafe_loading_requested():
        warnings.warn(unsafe_loading_warning(), UserWarning, stacklevel=2)
