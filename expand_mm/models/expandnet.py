"""``type='ExpandNet'``: build a stock compact model and expand it for training.

Registered in MMEngine's root ``MODELS`` registry, so a config in either the
mmdet or the mmseg scope finds it (child registries fall back to the root).

Why a builder and not a wrapping ``nn.Module``: the object returned IS the stock
detector / segmentor (``YOLOV3``, ``EncoderDecoder``, ...) with some of its
convolutions replaced by :class:`~expand_mm.layers.ExpandConv2d`. Every mmdet /
mmseg code path -- ``train_step``, the data preprocessor, ``predict``, metrics,
visualisation hooks, ``init_detector`` / ``init_model``, hooks that reach into
``model.bbox_head`` -- sees the class it expects, and the state-dict keys outside
the expanded layers stay the stock ones. The expansion settings and report are
attached to the model as ``model.expandnet_cfg`` / ``model.expansion_report``.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Sequence

from mmengine.logging import MMLogger
from mmengine.model import BaseModule, is_model_wrapper
from mmengine.registry import MODELS
from torch import nn

from ..surgery import ExpansionReport, expand_model

EXPANDNET_KEYS = ('strategy', 'ratio', 'mode', 'include', 'exclude', 'expand_1x1',
                  'expand_linear', 'keep_weights', 'init')


def _pretrained_paths(model: nn.Module) -> list[str]:
    """Module paths whose ``init_cfg`` loads pretrained weights."""
    paths = []
    for path, module in model.named_modules():
        init_cfg = getattr(module, 'init_cfg', None)
        cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
        if any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in cfgs):
            paths.append(path if path else '*')
    return paths


def build_expandnet(model: dict,
                    strategy: str = 'cl',
                    ratio: int = 4,
                    mode: str = 'online',
                    include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None,
                    expand_1x1: bool = False,
                    expand_linear: bool = False,
                    keep_weights: bool | Sequence[str] = False,
                    init: str = 'fresh',
                    data_preprocessor: dict | None = None) -> nn.Module:
    """Build the compact model from ``model`` and expand it in place.

    The compact model is initialised first (its ``init_cfg``, including
    ``Pretrained`` backbones, acts on the compact layers whose keys it knows),
    then expanded, so the optimizer that the runner builds afterwards sees the
    factors. The runner's later ``init_weights()`` call is then a no-op.

    Args:
        model: Config of the stock compact model (e.g. ``{{_base_.model}}``).
        strategy: ``'cl'``, ``'ck'`` or ``'auto'`` (see
            :func:`expand_mm.expand_model`).
        ratio: Expansion ratio (the paper uses 4).
        mode: ``'online'`` (default, near-compact training cost) or ``'explicit'``.
        include: Glob patterns of module paths to expand (default: all).
        exclude: Glob patterns of module paths to leave compact.
        expand_1x1: Also expand 1×1 convs.
        expand_linear: Also expand linear layers.
        keep_weights: ``True`` / a list of path patterns: factorise those layers
            so they compute exactly what the initialised compact layer did.
            Layers under a module with a ``Pretrained`` ``init_cfg`` always keep
            their (pretrained) weights.
        init: ``'fresh'``: every other expanded sub-layer is initialised as a
            standalone conv of its shape (the paper); ``'compact'``: every
            expanded layer starts from the compact model's own initialisation
            (same as ``keep_weights=True``).
        data_preprocessor: Passed on to the compact model when its config has
            none (MMEngine's Runner adds the config's top-level
            ``data_preprocessor`` to the model dict it builds).

    Returns:
        The stock model instance, expanded, with ``expandnet_cfg`` and
        ``expansion_report`` attributes.
    """
    if init not in ('fresh', 'compact'):
        raise ValueError(f"ExpandNet: init={init!r} must be 'fresh' or 'compact'")
    if not isinstance(model, dict) or 'type' not in model:
        raise ValueError('ExpandNet: `model` must be the config dict of the compact model '
                         "(e.g. model=dict(type='ExpandNet', model={{_base_.model}}, ...))")
    logger = MMLogger.get_current_instance()
    model = copy.deepcopy(model)
    if data_preprocessor is not None:
        model.setdefault('data_preprocessor', data_preprocessor)
    compact = MODELS.build(model)
    if isinstance(compact, BaseModule):
        compact.init_weights()

    if init == 'compact' or keep_weights is True:
        keep: bool | list[str] = True
    else:
        keep = list(keep_weights or []) + _pretrained_paths(compact)
    report = expand_model(compact, strategy=strategy, ratio=ratio, mode=mode,
                          include=include, exclude=exclude, expand_1x1=expand_1x1,
                          expand_linear=expand_linear, keep_weights=keep or False)
    _skip_later_init(compact)
    compact.expandnet_cfg = dict(strategy=strategy, ratio=ratio, mode=mode, include=include,
                                 exclude=exclude, expand_1x1=expand_1x1,
                                 expand_linear=expand_linear, keep_weights=keep_weights,
                                 init=init)
    compact.expansion_report = report
    logger.info(f'ExpandNet ({type(compact).__name__}):\n{report}')
    return compact


MODELS.register_module(name='ExpandNet', module=build_expandnet)


def _skip_later_init(model: nn.Module) -> None:
    """Make the runner's ``init_weights()`` call a logged no-op.

    The model was initialised before expansion; a second pass would re-run the
    ``init_cfg``s on the expanded sub-layers (e.g. ``Normal(layer='Conv2d')`` on
    every factor) and MMEngine would warn that it was called twice.
    """
    def init_weights(self) -> None:
        MMLogger.get_current_instance().info(
            'ExpandNet: weights were initialised before expansion; skipping init_weights()')

    model.init_weights = types.MethodType(init_weights, model)


def deployable_model(model: nn.Module) -> nn.Module:
    """The module whose contraction is the deployed model.

    Unwraps DDP-style model wrappers; a training-time wrapper (a distiller, an
    auxiliary-branch model) that holds the deployable network elsewhere
    implements ``deployable_model() -> nn.Module`` and is unwrapped through it.
    """
    while True:
        if is_model_wrapper(model):
            model = model.module
        elif callable(getattr(model, 'deployable_model', None)):
            inner = model.deployable_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def expansion_report(model: nn.Module) -> ExpansionReport | None:
    """The :class:`ExpansionReport` attached to an ExpandNet, if any."""
    return getattr(deployable_model(model), 'expansion_report', None)


def compact_model_cfg(cfg: Any) -> Any:
    """The compact model config inside an ExpandNet model config (or ``cfg`` itself)."""
    if isinstance(cfg, dict) and cfg.get('type') == 'ExpandNet':
        return cfg['model']
    return cfg
