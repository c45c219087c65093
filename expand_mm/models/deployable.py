"""Which network is the deployable one: the protocol every model of expand_mm joins.

A model trained by expand_mm deploys one network: a stock compact model (or
its ExpandNet, contracted). Training-time wrappers hold it as a submodule and
add what only training needs (a teacher, adapters, an auxiliary branch).
Everything that writes, loads or checks checkpoints asks this module, never a
type name:

- **At run time**, a model that holds its deployable network elsewhere
  implements ``deployable_model() -> nn.Module`` (the wrappers do); any other
  model is its own deployable network (a plain model, an ExpandNet). DDP-style
  wrappers and test-time-augmentation models are unwrapped on the way.
- **In a config**, a registered model type whose config holds the deployable
  network's config has a ``deployable_cfg(cfg) -> inner cfg`` attribute: a
  classmethod on a wrapper class, or set with :func:`declares_deployable_cfg`
  on a builder function (``type='ExpandNet'``).

This module imports no model of expand_mm: ExpandNet and the wrappers import
it, never each other.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping

from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import MODELS
from torch import nn

from ..errors import ConfigError
from .model_cfg import API_MODEL_KEYS, apply_data_preprocessor


def wraps_a_model(model: nn.Module) -> bool:
    """Whether ``model`` only wraps ``model.module``: a DDP-style wrapper, or a
    test-time-augmentation model (MMEngine's checkpoint loading unwraps both)."""
    return is_model_wrapper(model) or isinstance(model, BaseTTAModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP-style model wrappers (``MMDistributedDataParallel``, ...)
    and test-time-augmentation models, as MMEngine's checkpoint loading unwraps them."""
    while wraps_a_model(model):
        model = model.module
    return model


def deployable_model(model: nn.Module) -> nn.Module:
    """The module whose contraction is the deployed model.

    Unwraps DDP-style model wrappers and test-time-augmentation models; a
    training-time wrapper (a distiller, an auxiliary-branch model) that holds
    the deployable network elsewhere implements
    ``deployable_model() -> nn.Module`` and is unwrapped through it.
    """
    while True:
        if wraps_a_model(model):
            model = model.module
        elif callable(getattr(model, 'deployable_model', None)):
            inner = model.deployable_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def find_deployable(model: nn.Module) -> tuple[nn.Module, str]:
    """The deployable network of ``model`` and its state-dict prefix in ``model``.

    The deployable network is :func:`deployable_model`'s; its prefix is its
    path among the unwrapped model's ``named_modules()``, found by identity,
    so a wrapper may keep it under any attribute, at any depth (``'student.'``,
    ``'student.model.'``).

    Args:
        model: A plain model, an ExpandNet, a training-time wrapper, possibly
            inside a DDP-style model wrapper.

    Returns:
        ``(deployable, prefix)``; ``prefix`` is ``''`` when the model is its
        own deployable network, else ends with ``'.'``.

    Raises:
        ConfigError: If the wrapper's ``deployable_model()`` is not one of its
            submodules (its weights would not be in the checkpoint).
    """
    root = unwrap_model(model)
    target = deployable_model(root)
    if target is root:
        return target, ''
    for path, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return target, path + '.'
    raise ConfigError(
        f'{type(root).__name__}.deployable_model() returned a {type(target).__name__} that '
        f'is not a submodule of the {type(root).__name__}: the wrapper must hold the '
        'deployable network as a submodule (an nn.Module attribute, e.g. self.student) so '
        'that its weights are in the training checkpoint')


def deferring_expandnet(model: nn.Module) -> nn.Module | None:
    """The deployable network of ``model`` when it defers its factor gradients, else None.

    ``model`` may be an ExpandNet, a training-time wrapper around one or a DDP
    wrapper; an ExpandNet built with ``defer_factor_grads=True`` records it in
    its ``expandnet_cfg``.
    """
    inner = deployable_model(model)
    cfg = getattr(inner, 'expandnet_cfg', None) or {}
    return inner if cfg.get('defer_factor_grads') else None


def declares_deployable_cfg(getter: Callable[[Mapping], Any]) -> Callable:
    """Decorator joining a registered model *builder function* to the config protocol.

    ``getter(cfg)`` returns the deployable network's config inside a config of
    the builder's type (a wrapper class defines a ``deployable_cfg``
    classmethod instead).
    """
    def mark(builder: Callable) -> Callable:
        builder.deployable_cfg = getter
        return builder
    return mark


def _deployable_cfg_getter(model_type: Any) -> tuple[Callable | None, set[str]]:
    """The ``deployable_cfg`` of a registered model type, and the options it takes itself."""
    builder = MODELS.get(model_type) if isinstance(model_type, str) else model_type
    getter = getattr(builder, 'deployable_cfg', None)
    if not callable(getter):
        return None, set()
    return getter, set(inspect.signature(builder).parameters)


def deployable_model_cfg(cfg: Any) -> Any:
    """The stock compact model config inside ExpandNet / training-wrapper configs.

    Follows each registered type's ``deployable_cfg`` (the config counterpart
    of ``deployable_model()``); any other config is returned as it is (the
    same object). As the builders do, the keys mm APIs set on a wrapper
    (``test_cfg``, ``train_cfg``, ``init_cfg``, ``pretrained``, unless the
    wrapper takes them itself) override the inner config's, and a wrapper's
    ``data_preprocessor`` is the inner model's when the inner config has none:
    a ``test_cfg`` set on an ExpandNet config (sliding-window testing) holds
    for its compact model too.

    Args:
        cfg: A model config (e.g. ``cfg.model``).
    """
    while isinstance(cfg, Mapping):
        getter, own = _deployable_cfg_getter(cfg.get('type'))
        if getter is None:
            break
        inner = getter(cfg)
        passed = {key: copy.deepcopy(cfg[key]) for key in API_MODEL_KEYS
                  if key in cfg and key not in own}
        preprocessor = cfg.get('data_preprocessor')
        if isinstance(inner, Mapping) and (passed or preprocessor is not None):
            inner = copy.deepcopy(inner)
            apply_data_preprocessor(inner, preprocessor, str(cfg.get('type')), announce=False)
            inner.update(passed)
        cfg = inner
    return cfg


#: Alias of :func:`deployable_model_cfg` (a public name of ``expand_mm.models``).
compact_model_cfg = deployable_model_cfg
