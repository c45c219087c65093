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
attached to the model as ``model.expandnet_cfg`` / ``model.expansion_report``, and
its ``init_weights`` is replaced by :func:`init_expanded_weights`.
"""
from __future__ import annotations

import copy
import difflib
import functools
from typing import Any, Sequence

from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import nn

from ..budget import expand_within_budget
from ..cost import config_input_size
from ..errors import ConfigError
from ..layers import ExpandConv2d
from ..layers import deferral_unsupported_reason, deferred_factor_grads
from ..surgery import (ExpansionReport, ExpansionSettings, expand_model, expanded_layers,
                       path_matches, replace_submodule)
from .deployable import (compact_model_cfg, declares_deployable_cfg,  # noqa: F401
                         deferring_expandnet, deployable_model, deployable_model_cfg,
                         wraps_a_model)
from .model_cfg import API_MODEL_KEYS, apply_data_preprocessor, check_model_overrides

EXPANDNET_INITS = ('fresh', 'orthogonal', 'compact')
EXPANDNET_KEYS = ('strategy', 'ratio', 'mode', 'include', 'exclude', 'expand_1x1',
                  'expand_linear', 'keep_weights', 'init', 'defer_factor_grads', 'budget',
                  'max_train_memory')


def _pretrained_paths(model: nn.Module) -> list[str]:
    """Module paths whose ``init_cfg`` loads pretrained weights."""
    paths = []
    for path, module in model.named_modules():
        init_cfg = getattr(module, 'init_cfg', None)
        cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
        if any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in cfgs):
            paths.append(path if path else '*')
    return paths


@declares_deployable_cfg(lambda cfg: cfg['model'])
def build_expandnet(model: dict | None = None,
                    strategy: str = 'cl',
                    ratio: int | dict[str, int] | Sequence[tuple[str, int]] = 4,
                    mode: str = 'online',
                    include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None,
                    expand_1x1: bool = False,
                    expand_linear: bool = False,
                    keep_weights: bool | Sequence[str] = False,
                    init: str = 'orthogonal',
                    defer_factor_grads: bool = True,
                    budget: dict | None = None,
                    max_train_memory: float | None = None,
                    data_preprocessor: dict | None = None,
                    **model_overrides: Any) -> nn.Module:
    """Build the compact model from ``model`` and expand it in place.

    Expansion happens here, at build time, so the optimizer that the runner
    builds afterwards collects the factors. Initialisation stays where MMEngine
    puts it (``runner.train()`` calls ``model.init_weights()``; testing and
    inference never do, so nothing is downloaded for them) but acts on the
    compact form: see :func:`init_expanded_weights`.

    Args:
        model: Config of the stock compact model (e.g. ``{{_base_.model}}``).
        strategy: ``'cl'``, ``'ck'`` or ``'auto'`` (see
            :func:`expand_mm.expand_model`).
        ratio: Expansion ratio (the paper uses 4), or per-layer ratios: a list of
            ``(pattern, ratio)`` pairs (first match wins) or a mapping (most specific
            pattern wins; see :class:`expand_mm.surgery.ExpansionSettings`).
        mode: ``'online'`` (default, near-compact training cost) or ``'explicit'``.
        include: Glob patterns of module paths to expand (default: all).
        exclude: Glob patterns of module paths to leave compact.
        expand_1x1: Also expand 1×1 convs.
        expand_linear: Also expand linear layers.
        keep_weights: ``True`` or glob patterns of module paths: at
            ``init_weights()`` these layers are factorised so that they compute
            exactly what the initialised compact layer does. Layers under a
            module with a ``Pretrained`` ``init_cfg`` always keep their
            (pretrained) weights.
        init: ``'orthogonal'`` (default): the other expanded layers keep the
            norms of each sub-layer's standalone init, with every factor's
            singular values made equal (see
            :meth:`~expand_mm.layers.ExpandedLayer.orthogonalise_factors`; measured
            in ``docs/studies.md``); ``'fresh'``: the standalone init as it is (the
            paper); ``'compact'``: every expanded layer
            starts from the compact model's initialisation (= ``keep_weights=True``).
        defer_factor_grads: During ``model.train_step`` (MMEngine's training
            loop on one device) online layers compose each weight once and give
            their factors the gradients at the end of the backward pass, after
            the activations are freed: same gradients, lower peak memory (see
            :func:`expand_mm.surgery.deferred_factor_grads`). Distributed
            training runs the wrapper's train step, not the model's: use
            ``model_wrapper_cfg=dict(type='ExpandNetDistributedDataParallel')``
            (the stock ``MMDistributedDataParallel`` keeps plain autograd).
        budget: ``dict(train_step=1.10, train_memory=1.10, batch_size=...,
            img_size=(H, W), ratios=(1, 2, 4))``: the per-layer ratios are
            planned so that the predicted training cost stays within these ratios
            to the compact model's (see :mod:`expand_mm.budget`); give the
            config's training batch size and input size (e.g.
            ``batch_size={{_base_.train_dataloader.batch_size}}``). Replaces ``ratio``.
        max_train_memory: Cap in GiB on the predicted training state (parameters,
            gradients, optimizer state); default: the memory available.
        data_preprocessor: Given to the compact model when its config has none
            (MMEngine's Runner adds the config's top-level ``data_preprocessor``
            to the model dict it builds); one without a ``type`` changes those
            keys of the compact model's (see :func:`apply_data_preprocessor`).
        **model_overrides: Keys that mm APIs set on the top-level model dict
            (``API_MODEL_KEYS``: mmseg's ``init_model`` sets ``pretrained`` and
            ``train_cfg``); they are applied to the compact model's config.
            Any other key is refused, naming the nearest ExpandNet option.

    Returns:
        The stock model instance, expanded, with ``expandnet_cfg`` and
        ``expansion_report`` attributes.
    """
    if model is None:  # e.g. misspelled: `modle={{_base_.model}}` lands in model_overrides
        typo = difflib.get_close_matches('model', [k for k in model_overrides
                                                   if k not in API_MODEL_KEYS], n=1)
        raise ConfigError(
            "ExpandNet: `model`, the compact model's config, is missing"
            + (f' ({typo[0]!r}: did you mean \'model\'?)' if typo else '')
            + ": model=dict(_delete_=True, type='ExpandNet', model={{_base_.model}}, ...)")
    if init not in EXPANDNET_INITS:
        raise ConfigError(f'ExpandNet: init={init!r} must be one of {EXPANDNET_INITS}')
    if not isinstance(defer_factor_grads, bool):
        raise ConfigError(f'ExpandNet: defer_factor_grads={defer_factor_grads!r} must be '
                          'True or False')
    if not isinstance(model, dict) or 'type' not in model:
        raise ConfigError('ExpandNet: `model` must be the config dict of the compact model '
                          "(e.g. model=dict(type='ExpandNet', model={{_base_.model}}, ...))")
    if isinstance(keep_weights, str):  # one pattern, as --cfg-options passes it
        keep_weights = [keep_weights]
    if not isinstance(keep_weights, bool) and (
            not isinstance(keep_weights, (list, tuple))
            or not all(isinstance(p, str) for p in keep_weights)):
        raise ConfigError(f'ExpandNet: keep_weights={keep_weights!r} must be True/False or a '
                          "list of module-path glob patterns such as ['backbone.*']")
    check_model_overrides(model_overrides, 'ExpandNet',
                          EXPANDNET_KEYS + ('data_preprocessor',), model, 'model')
    if defer_factor_grads:
        unsupported = deferral_unsupported_reason()
        if unsupported is not None:
            MMLogger.get_current_instance().warning(
                f'ExpandNet: defer_factor_grads=True is not available ({unsupported}); '
                'training uses plain autograd (same gradients, higher peak memory)')
            defer_factor_grads = False
    model = copy.deepcopy(model)
    apply_data_preprocessor(model, data_preprocessor, 'ExpandNet')
    model.update(model_overrides)
    compact = MODELS.build(model)

    if init == 'compact' or keep_weights is True:
        keep: bool | list[str] = True
    else:
        keep = list(keep_weights or []) + _pretrained_paths(compact)
    settings = ExpansionSettings(strategy=strategy, ratio=ratio, mode=mode, include=include,
                                 exclude=exclude, expand_1x1=expand_1x1,
                                 expand_linear=expand_linear, max_train_memory=max_train_memory)
    report = (expand_model(compact, settings=settings) if budget is None
              else expand_within_budget(compact, budget, settings))
    ratio = report.settings.ratio  # the budget plan's per-layer ratios, when it chose them
    _check_keep_patterns_match(compact, keep_weights)
    _check_kept_layers_factorise_exactly(compact, keep, ratio)
    compact.expandnet_cfg = dict(strategy=strategy, ratio=ratio, mode=mode, include=include,
                                 exclude=exclude, expand_1x1=expand_1x1,
                                 expand_linear=expand_linear, keep_weights=keep_weights,
                                 init=init, keep_paths=keep,
                                 defer_factor_grads=defer_factor_grads, budget=budget,
                                 max_train_memory=max_train_memory)
    compact.expansion_report = report
    if isinstance(compact, BaseModule):
        compact.init_weights = functools.partial(init_expanded_weights, compact)
    if defer_factor_grads and callable(getattr(compact, 'train_step', None)):
        compact.train_step = functools.partial(train_step_deferring_factor_grads, compact)
    MMLogger.get_current_instance().info(f'ExpandNet ({type(compact).__name__}):\n{report}')
    return compact


MODELS.register_module(name='ExpandNet', module=build_expandnet)


def _check_keep_patterns_match(model: nn.Module, keep_weights: bool | list[str]) -> None:
    """Refuse a ``keep_weights`` pattern that selects no expanded layer (a typo would
    otherwise start every layer from fresh factors without a word)."""
    if isinstance(keep_weights, bool):
        return
    paths = [path for path, _ in expanded_layers(model)]
    for pattern in keep_weights:
        if any(path_matches(path, [pattern]) for path in paths):
            continue
        near = difflib.get_close_matches(pattern.replace('*', ''), paths, n=5, cutoff=0.5) \
            or sorted({path.split('.')[0] + '.*' for path in paths})[:5]
        raise ConfigError(
            f'ExpandNet: keep_weights pattern {pattern!r} matches no expanded layer (it '
            'selects expanded layers to factorise from their compact initialisation; a '
            f"layer left compact keeps its weights anyway). Nearest: {', '.join(near)}")


def _check_kept_layers_factorise_exactly(model: nn.Module, keep: bool | list[str],
                                         ratio: int) -> None:
    """Refuse, at build time, kept CK layers whose ratio is too small to factorise.

    ``init_weights()`` factorises every kept layer (``init='compact'``,
    ``keep_weights``, a ``Pretrained`` ``init_cfg``) exactly from its compact
    initialisation; a CK chain needs a minimum ratio for that, and finding out
    only when the runner initialises the model wastes the build and data setup.
    """
    short = [(path, layer) for path, layer in expanded_layers(model)
             if isinstance(layer, ExpandConv2d)
             and (keep is True or (keep and path_matches(path, keep)))
             and layer.ratio < layer.exact_min_ratio()]
    if not short:
        return
    why = ("init='compact' / keep_weights=True" if keep is True else
           f'keep_weights / a Pretrained init_cfg (patterns {keep})')
    need = max(layer.exact_min_ratio() for _, layer in short)
    listed = ', '.join(f'{path} ({layer.kernel_size[0]}x{layer.kernel_size[1]}, needs ratio >= '
                       f'{layer.exact_min_ratio()})' for path, layer in short[:6])
    raise ConfigError(
        f'ExpandNet: {why} asks for an exact CK factorisation of {len(short)} layer(s) at '
        f"ratio={ratio}, too small for: {listed}{' ...' if len(short) > 6 else ''}. Use "
        f"strategy='cl' (exact for any ratio), ratio >= {need}, or leave these layers out "
        'of keep_weights / the expansion (exclude=[...]).')


def init_expanded_weights(model: BaseModule) -> None:
    """``init_weights()`` of an ExpandNet: initialise the compact form, then the factors.

    Every expanded layer is swapped for a compact stand-in while the model's own
    ``init_weights`` runs, so each ``init_cfg`` -- ``Pretrained`` checkpoints
    with their stock keys, ``Normal(layer='Conv2d')``, ``ConvModule``'s kaiming,
    a head's prior bias -- acts on the layers it was written for, not on every
    factor. Then the expanded layers are put back (same parameter objects, so
    the optimizer is unaffected); those selected by ``keep_paths`` (pretrained
    modules, ``keep_weights``, ``init='compact'``) are factorised exactly from
    their initialised compact stand-in, the others keep their fresh factor
    weights (orthogonalised under ``init='orthogonal'``, the default) but take
    the stand-in's bias as their composed bias, so an
    initialised bias (a detection head's prior, ``bias_prob=0.01``) survives
    when such a conv is expanded (``expand_1x1=True`` on YOLO heads).
    """
    layers = expanded_layers(model)
    for path, layer in layers:
        replace_submodule(model, path, layer.contract())
    try:
        type(model).init_weights(model)
    finally:
        stand_ins = {path: model.get_submodule(path) for path, _ in layers}
        for path, layer in layers:
            replace_submodule(model, path, layer)
    keep = model.expandnet_cfg['keep_paths']
    orthogonalise = model.expandnet_cfg['init'] == 'orthogonal'
    kept = 0
    for path, layer in layers:
        stand_in = stand_ins[path]
        if keep is True or (keep and path_matches(path, keep)):
            layer.set_compact(stand_in.weight.detach(),
                              None if stand_in.bias is None else stand_in.bias.detach())
            kept += 1
            continue
        layer.remember_compact_reference(stand_in.weight)
        if orthogonalise:
            layer.orthogonalise_factors()
        if stand_in.bias is not None:
            layer.set_composed_bias(stand_in.bias.detach())
    others = f"{'orthogonal' if orthogonalise else 'fresh'} factors"
    MMLogger.get_current_instance().info(
        f'ExpandNet: initialised the compact form; {kept} of {len(layers)} expanded layers '
        'factorised from it exactly'
        + (f', the others start from {others}' if kept < len(layers) else ''))


def train_step_deferring_factor_grads(model: nn.Module, data: Any, optim_wrapper: Any) -> Any:
    """``train_step`` of an ExpandNet: the model's own, with deferred factor gradients.

    MMEngine's ``train_step`` ends in ``optim_wrapper.update_params(loss)``
    (``loss.backward()``, then the step), the use that
    :func:`~expand_mm.surgery.deferred_factor_grads` is made for.
    """
    with deferred_factor_grads(model):
        return type(model).train_step(model, data, optim_wrapper)


def expansion_report(model: nn.Module) -> ExpansionReport | None:
    """The :class:`ExpansionReport` attached to an ExpandNet, if any."""
    return getattr(deployable_model(model), 'expansion_report', None)


def config_training_settings(cfg: Any) -> tuple[int, tuple[int, int]]:
    """``(batch_size, (H, W))`` a config trains at, for a budget that does not give them.

    The batch size is ``train_dataloader.batch_size`` (per device). The input
    size is the data preprocessor's ``size`` (mmseg pads every batch to its
    training crop) when the model config has one, else the test input size
    (:func:`expand_mm.cost.config_input_size`; detectors train at about the
    size they test at).

    Raises:
        ConfigError: If either cannot be read from the config.
    """
    batch_size = (cfg.get('train_dataloader') or {}).get('batch_size')
    preprocessor = deployable_model_cfg(cfg.model).get('data_preprocessor') or {}
    size = preprocessor.get('size') if isinstance(preprocessor, dict) else None
    if size is None:
        found = config_input_size(cfg)
        size = found[0] if found else None
    if not isinstance(batch_size, int) or size is None:
        raise ConfigError(
            'budget: cannot read the training batch size (train_dataloader.batch_size) and '
            'input size (data_preprocessor.size or the test pipeline Resize) from the config; '
            'give budget batch_size=... and img_size=(H, W)')
    return batch_size, (int(size[0]), int(size[1]))
