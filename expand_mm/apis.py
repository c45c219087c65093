"""Deployment in one call: the stock compact model of any expand_mm config.

mmdet's ``init_detector`` reads ``config.model.backbone`` before it builds
the model (to switch off pretrained weights), and an ExpandNet or wrapper
model dict has no ``backbone``: the compact model's config sits in its
``model`` / ``student`` key. :func:`init_compact_model` unwraps the config
(:func:`compact_config`), contracts a training checkpoint when it is given
one, and hands both to the stock ``init_detector`` / ``init_model``, so what
it returns is what the stock API returns for the compact config and its
``*_compact.pth``.
"""
from __future__ import annotations

import copy
import os.path as osp
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from torch import nn

from . import hooks as _hooks
from .checkpoint import CheckpointError, check_plain_model_checkpoint, read_checkpoint, strip_prefix
from .compat import type_name
from .deploy import compact_checkpoint, compact_checkpoint_path
from .errors import ConfigError
from .models.deployable import deployable_model_cfg
from .planting import unfinished_planting

#: expand_mm's hooks that act on the training form (expanded layers, a wrapper, planting),
#: none has a use in the compact model's config (the checkpoint and RNG hooks serve any model).
TRAINING_FORM_HOOKS = frozenset(name for name in _hooks.__all__ if name.endswith('Hook')) - {
    'SafeCheckpointHook', 'RNGStateHook'}


def load_config(config: str | Path | Config, cfg_options: Mapping | None = None) -> Config:
    """A config from a file, a ``package::path`` (``'mmdet::yolox/...py'``) or a Config.

    Args:
        config: The config; a Config is copied, not changed.
        cfg_options: Overrides merged into it, as ``--cfg-options`` does.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, (str, Path)):
        if '::' in str(config):
            # mmengine resolves package paths for _base_ only; its hub does it for a file.
            from mmengine.hub import get_config
            cfg = get_config(str(config))
        else:
            cfg = Config.fromfile(str(config))
    else:
        raise ConfigError(f'config must be a file path or an mmengine Config, got '
                          f'{type(config).__name__}')
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def compact_config(config: str | Path | Config, cfg_options: Mapping | None = None) -> Config:
    """The config of the compact model that an ExpandNet or wrapper config deploys.

    ``model`` becomes the stock compact model's config
    (:func:`~expand_mm.models.deployable_model_cfg`: the ExpandNet / wrapper
    unwrapped, the keys mm APIs set on it passed on) and expand_mm's hooks
    (``TRAINING_FORM_HOOKS``), which act on the training form, are dropped from
    ``default_hooks`` and ``custom_hooks``; everything else is the config's
    own. A compact config comes back as it is (a copy).

    Args:
        config: A config file, ``package::path`` or Config.
        cfg_options: Overrides merged into it first.
    """
    cfg = load_config(config, cfg_options)
    cfg.model = deployable_model_cfg(cfg.model)
    if isinstance(cfg.get('default_hooks'), Mapping):
        cfg.default_hooks = {key: hook for key, hook in cfg.default_hooks.items()
                             if not _is_training_form_hook(hook)}
    if cfg.get('custom_hooks'):
        cfg.custom_hooks = [hook for hook in cfg.custom_hooks
                            if not _is_training_form_hook(hook)]
    return cfg


def _is_training_form_hook(hook: Any) -> bool:
    return isinstance(hook, Mapping) and type_name(hook.get('type', '')) in TRAINING_FORM_HOOKS


def build_training_model(cfg: Config) -> nn.Module:
    """``cfg.model`` built as MMEngine's Runner builds it (with the top-level
    ``data_preprocessor``, in the config's default scope), weights uninitialised."""
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        return MODELS.build(model_cfg)


def compact_checkpoint_of(cfg: Config, checkpoint: str) -> tuple[dict, bool]:
    """The compact checkpoint of ``cfg``'s deployable model held by a checkpoint file.

    A file that gives the compact model all its weights (a ``*_compact.pth``,
    a stock checkpoint) is returned as read. A training checkpoint of an
    ExpandNet or wrapper config is contracted (its deployable network;
    see :func:`~expand_mm.deploy.compact_checkpoint`, which also bakes a
    channel-planting stage and refuses the nonlinear phase of
    ``NonlinearInitHook``).

    Args:
        cfg: The config the checkpoint belongs to (ExpandNet, wrapper or compact).
        checkpoint: The file.

    Returns:
        ``(checkpoint_dict, contracted)``: ``meta`` and ``state_dict``, and
        whether it was made here.

    Raises:
        CheckpointError: If the file fits neither form; with a compact config
            and an ExpandNet training checkpoint, the message names its
            ``*_compact.pth`` and ``tools/contract.py``.
    """
    saved = read_checkpoint(checkpoint)
    meta = saved.get('meta') or {}
    state_dict = strip_prefix(saved['state_dict'])
    compact_cfg = deployable_model_cfg(cfg.model)
    if not unfinished_planting(meta):
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            compact = MODELS.build(compact_cfg)
        try:
            check_plain_model_checkpoint(compact, state_dict, checkpoint)
            return saved, False
        except CheckpointError:
            if compact_cfg is cfg.model:  # a compact config: nothing to contract with
                raise
    model = build_training_model(cfg)
    contracted, _ = compact_checkpoint(model, meta, checkpoint, state_dict, verify=False)
    return contracted, True


def _stock_init(cfg: Config) -> Callable[..., nn.Module]:
    """mmdet's ``init_detector`` or mmseg's ``init_model``, by the config's default scope."""
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        from mmdet.apis import init_detector
        return init_detector
    if scope == 'mmseg':
        from mmseg.apis import init_model
        return init_model
    raise ConfigError(f"init_compact_model: default_scope={scope!r}; expected 'mmdet' (mmdet's "
                      "init_detector) or 'mmseg' (mmseg's init_model)")


def init_compact_model(config: str | Path | Config, checkpoint: str | None = None,
                       device: str | None = None, cfg_options: Mapping | None = None,
                       **kwargs: Any) -> nn.Module:
    """The deployed compact model of a config, from a compact or a training checkpoint.

    ``config`` may be an ExpandNet config, a training-time wrapper's
    (``Distiller``, ``AuxOverParam``) or a compact one, as a file,
    ``package::path`` or Config; ``checkpoint`` a ``*_compact.pth`` (any stock
    checkpoint of the compact model) or a training checkpoint of ``config``,
    which is contracted in memory. The model comes from mmdet's
    ``init_detector`` or mmseg's ``init_model`` given :func:`compact_config`
    and the compact checkpoint, so it is the stock class with the stock
    ``cfg`` and ``dataset_meta``, ready for ``inference_detector`` /
    ``inference_model``.

    Args:
        config: The config.
        checkpoint: The weights; None builds the compact model uninitialised,
            as the stock functions do.
        device: Where to put the model; default ``'cuda:0'`` when CUDA is
            available, else ``'cpu'``.
        cfg_options: Overrides merged into the config first.
        **kwargs: Passed to the stock function (e.g. mmdet's ``palette``).

    Raises:
        CheckpointError: If the checkpoint fits neither the compact model nor
            the config's training form (see :func:`compact_checkpoint_of`).
        ConfigError: If the config is neither mmdet's nor mmseg's.
    """
    cfg = load_config(config, cfg_options)
    init = _stock_init(cfg)
    deploy_cfg = compact_config(cfg)
    device = device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    if checkpoint is None:
        return init(deploy_cfg, None, device=device, **kwargs)
    compact, contracted = compact_checkpoint_of(cfg, checkpoint)
    if not contracted:
        return init(deploy_cfg, checkpoint, device=device, **kwargs)
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, osp.basename(compact_checkpoint_path(checkpoint)))
        torch.save(compact, path)
        return init(deploy_cfg, path, device=device, **kwargs)
