"""``type='AuxOverParam'``: a wider, training-only copy of the head on the compact net.

Auxiliary over-parameterisation: besides its own head, the compact network
(a stock model or an ExpandNet of one) feeds a *wider* copy of that head --
built from the head's own config with its hidden widths multiplied by
``width_mult`` -- during training. The wide head's losses, weighted by
``aux_weight``, reach the shared backbone and neck, whose features must then
serve both heads; at inference the branch is dropped. The wrapper is a
training-time wrapper (see :mod:`expand_mm.models.wrappers`): prediction,
validation and testing run the compact network alone, and the compact
checkpoint written by :class:`~expand_mm.hooks.ContractCheckpointHook` holds
only the compact network (contracted if it is an ExpandNet), so it loads with
``strict=True`` into the stock compact config.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Sequence

from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..errors import ConfigError, SetupError
from ..surgery import contract_model, count_params, expanded_layers
from .model_cfg import check_model_overrides
from .deployable import deployable_model_cfg
from .wrappers import TrainingWrapper, add_loss_prefix, build_inner_model, record_forward

# Head config keys that hold hidden widths (scaled); input and class counts are not.
DEFAULT_WIDTH_KEYS = ('channels', 'out_channels', 'feat_channels')
HEAD_NAMES = ('bbox_head', 'decode_head')
AUX_OVERPARAM_KEYS = ('model', 'head', 'width_mult', 'aux_weight', 'width_keys', 'aux_head',
                      'loss_prefix', 'data_preprocessor', 'init_cfg')


def widen_head_cfg(head_cfg: dict, width_mult: float,
                   width_keys: Sequence[str] = DEFAULT_WIDTH_KEYS,
                   owner: str = 'AuxOverParam') -> dict:
    """A copy of ``head_cfg`` with every top-level width key multiplied by ``width_mult``.

    Keys not in ``width_keys`` -- by default input channels (``in_channels``:
    the compact net's features feed the wide head) and class counts -- are
    left as they are.

    Raises:
        ConfigError: If the config has none of ``width_keys``.
    """
    cfg = copy.deepcopy(dict(head_cfg))
    found = [k for k in width_keys if k in cfg]
    if not found:
        raise ConfigError(
            f'{owner}: the head config (type {cfg.get("type")!r}) has none of the width '
            f'keys {list(width_keys)}; set width_keys to its hidden-width keys or give '
            'aux_head=dict(...) explicitly')
    for key in found:
        value = cfg[key]
        scale = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        cfg[key] = (type(value)(scale(c) for c in value) if isinstance(value, (list, tuple))
                    else scale(value))
    return cfg


def check_width_and_weight(owner: str, width_mult: Any, aux_weight: Any) -> None:
    """Refuse a ``width_mult`` that is not a number > 0 or an ``aux_weight`` below 0."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) \
            or not width_mult > 0:
        raise ConfigError(f'{owner}: width_mult={width_mult!r} must be a number > 0 '
                          '(the auxiliary branch is that many times wider, e.g. 2.0)')
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) \
            or not aux_weight >= 0:
        raise ConfigError(f'{owner}: aux_weight={aux_weight!r} must be a number >= 0 '
                          "(the weight of the auxiliary branch's loss, e.g. 1.0)")


def pick_head(owner: str, model: nn.Module, compact_cfg: dict, head: str | None) -> str:
    """The attribute name of the compact network's task head (``head`` checked, or found).

    Raises:
        ConfigError: If ``head`` is not a module of ``model`` or none of
            :data:`HEAD_NAMES` is in the config.
    """
    if head is None:
        head = next((h for h in HEAD_NAMES if compact_cfg.get(h)), None)
        if head is None:
            raise ConfigError(f'{owner}: model.model (type {compact_cfg.get("type")!r}) '
                              f'has none of {HEAD_NAMES}; set head= to the attribute of '
                              'the head to widen')
    if not isinstance(getattr(model, head, None), nn.Module):
        raise ConfigError(f'{owner}: head={head!r} is not a module of the '
                          f'{type(model).__name__}; use one of '
                          f'{[n for n, _ in model.named_children()]}')
    return head


def wide_head_cfg(owner: str, compact_cfg: dict, head: str, width_mult: float,
                  width_keys: Sequence[str]) -> dict:
    """The config of a ``width_mult`` times wider copy of the compact network's ``head``.

    A detector's ``train_cfg`` / ``test_cfg`` (assigners, NMS), which the
    detector hands to its head, are given to the copy too.
    """
    if not isinstance(compact_cfg.get(head), dict):
        raise ConfigError(f'{owner}: the model config has no {head!r} dict to '
                          'widen; give aux_head=dict(...)')
    cfg = widen_head_cfg(compact_cfg[head], width_mult, width_keys, owner)
    if head == 'bbox_head':
        for key in ('train_cfg', 'test_cfg'):
            if compact_cfg.get(key) is not None:
                cfg.setdefault(key, copy.deepcopy(compact_cfg[key]))
    return cfg


def head_loss(aux_head: nn.Module, feats: Any, data_samples: Any, model: nn.Module) -> dict:
    """``aux_head.loss`` on ``feats``, with the model's ``train_cfg`` where the head takes
    it (mmseg's heads do, mmdet's hold their own)."""
    kwargs = {}
    if 'train_cfg' in inspect.signature(aux_head.loss).parameters:
        kwargs['train_cfg'] = getattr(model, 'train_cfg', None)
    return aux_head.loss(feats, data_samples, **kwargs)


class AuxBranchWrapper(TrainingWrapper):
    """Common part of the auxiliary-branch wrappers: the compact network ``self.model``
    is the deployable one, and the branch's losses join the model's under a prefix."""

    loss_prefix: str

    def deployable_model(self) -> nn.Module:
        """The compact network (without the auxiliary branch)."""
        return self.model

    @classmethod
    def deployable_cfg(cls, cfg: dict) -> dict:
        """The compact network's config."""
        return cfg['model']

    def _init_parts(self) -> Sequence[nn.Module]:
        return [self.model, self.aux_head]

    def _join_losses(self, losses: dict, aux: dict) -> dict:
        """``losses`` updated with the branch's ``aux`` (keys already prefixed).

        Raises:
            ConfigError: If a prefixed key is one the model logs itself.
        """
        clash = set(aux) & set(losses)
        if clash:
            raise ConfigError(f'{type(self).__name__}: loss_prefix={self.loss_prefix!r} gives '
                              f'keys the model logs itself ({sorted(clash)}); choose another '
                              'prefix')
        losses.update(aux)
        return losses


@MODELS.register_module()
class AuxOverParam(AuxBranchWrapper):
    """A compact detector / segmentor trained with a wider, training-only head.

    ``loss()`` runs the compact network's own ``loss()`` (every loss of the
    stock model, its auxiliary heads included), records the features its head
    receives, and adds the wide head's losses on the same features, each key
    prefixed with ``loss_prefix`` and scaled by ``aux_weight``.

    Args:
        model: Config of the compact network (a stock detector / segmentor or
            ``type='ExpandNet'``); it is the deployable model.
        head: Attribute of the model whose copy is widened (default:
            ``'bbox_head'`` for detectors, ``'decode_head'`` for segmentors).
        width_mult: Factor of the head's hidden widths.
        aux_weight: Factor of the wide head's losses.
        width_keys: Head config keys holding hidden widths.
        aux_head: Explicit config of the auxiliary head (then ``width_mult`` and
            ``width_keys`` are not used).
        loss_prefix: Prefix of the wide head's logged losses.
        data_preprocessor: The config's top-level ``data_preprocessor`` (the
            Runner adds it); given to the model config if it has none.
        init_cfg: Unused (each part initialises itself).
        **model_overrides: Keys mm APIs set on the top-level model dict
            (``pretrained``, ``train_cfg``), applied to the model's config.
    """

    def __init__(self, model: dict, head: str | None = None, width_mult: float = 2.0,
                 aux_weight: float = 1.0, width_keys: Sequence[str] = DEFAULT_WIDTH_KEYS,
                 aux_head: dict | None = None, loss_prefix: str = 'aux_op.',
                 data_preprocessor: dict | None = None, init_cfg: dict | None = None,
                 **model_overrides: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        check_width_and_weight('AuxOverParam', width_mult, aux_weight)
        check_model_overrides(model_overrides, 'AuxOverParam', AUX_OVERPARAM_KEYS, model,
                              'model')
        self.model = build_inner_model(model, 'model.model', 'AuxOverParam',
                                       data_preprocessor, model_overrides)
        self.data_preprocessor = self.model.data_preprocessor
        compact_cfg = deployable_model_cfg(dict(model))
        self.head = pick_head('AuxOverParam', self.model, compact_cfg, head)
        if aux_head is None:
            aux_head = wide_head_cfg('AuxOverParam', compact_cfg, self.head, width_mult,
                                     width_keys)
        else:
            aux_head = copy.deepcopy(dict(aux_head))
        self.aux_head = MODELS.build(aux_head)
        self.aux_weight = float(aux_weight)
        self.loss_prefix = loss_prefix
        main_head = getattr(self.model, self.head)
        if expanded_layers(main_head):  # compare with the deployed (compact) head
            main_head = contract_model(main_head)
        MMLogger.get_current_instance().info(
            f'AuxOverParam: training-only {type(self.aux_head).__name__} beside {self.head} '
            f'({count_params(self.aux_head):,} parameters vs {count_params(main_head):,} in the '
            f'compact {self.head}; width x{width_mult}, loss weight {aux_weight})')

    def loss(self, inputs: Tensor, data_samples: Any) -> dict:
        """The compact network's losses plus the weighted wide-head losses."""
        head = getattr(self.model, self.head)
        with record_forward({self.head: head}, inputs=True) as seen:
            losses = self.model.loss(inputs, data_samples)
        if self.head not in seen:
            raise SetupError(f'AuxOverParam: {self.head} did not run in the model\'s loss(); '
                             'set head= to the head its loss() calls')
        aux = head_loss(self.aux_head, seen[self.head], data_samples, self.model)
        aux = add_loss_prefix(aux, self.loss_prefix, self.aux_weight)
        return self._join_losses(losses, aux)
