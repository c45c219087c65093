"""Per-factor learning rates for ExpandNets under adaptive optimizers.

Why: Adam / AdamW move every parameter entry by about ``lr`` per step, whatever
its size, so a tensor changes by about ``lr / rms(entries)`` of itself per step.
An entry of a layer with fan-in ``f`` is of size ``~ 1/sqrt(f)`` at the standard
initialisations, so the relative step is ``~ lr * sqrt(f)``. A CL chain
``1x1 (m -> rm), kxk (rm -> rn), 1x1 (rn -> n)`` has fan-ins ``m``, ``r m k^2``
and ``r n``; the middle factor alone moves ``sqrt(r)`` times faster than the
compact ``kxk`` (fan-in ``m k^2``), and the relative changes of the factors add
up in the product. Measured on the digits demo: at the compact model's AdamW
learning rate an expanded model trains like a compact one at a several times
larger rate and stalls. Scaling each factor's rate by ``sqrt(f_compact / f_i)``
and sharing the compact step among the ``L`` factors (the ``'fan_in'`` rule)
removes the fan-in part. What it leaves is measured, not derived: sign-like
Adam steps of factors ``r`` times wider add up more coherently in the product
than the sum of relative changes says, and freshly initialised factors compose
to a smaller kernel than mmcv's kaiming init of the compact conv. One Adam step
of a fresh CL r=4 chain (dense 3x3, 16-128 channels; checked in
``tests/test_optim.py``) moves the composed kernel, relative to its size,
4.4-4.7x as far as a kaiming-initialised compact conv moves with the rule alone,
and 1.1-1.2x as far with the default extra factor ``DEFAULT_FACTOR_LR_MULT =
0.25``. SGD, whose step scales with the gradient, does not need any of it.
"""
from __future__ import annotations

import math
from typing import Any

from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from ..layers import ExpandedLayer

FACTOR_LR_RULES = ('fan_in', 'none')
# Optimizers whose step size does not scale with the gradient's magnitude (per
# entry or per tensor): the ones the fan-in rule is derived for. 'auto' uses it
# for these and leaves the rates alone for the others (SGD: the paper's setting).
ADAPTIVE_OPTIMIZERS = ('Adam', 'AdamW', 'Adamax', 'NAdam', 'RAdam', 'Adagrad', 'Adadelta',
                       'RMSprop', 'Lion', 'Adafactor')
CHAIN_RULES = ('sum', 'rss')
# Extra factor on the 'fan_in' rule (see the module docstring for the
# measurement). On the digits demo's schedules (README, calibration runs) it
# took the ExpandNet U-Net from mIoU 14.3 (factor 1) to 42.1, against 44.3 for
# the compact model, and the ExpandNet detector from mAP 22.1 to 31.8, against
# 30.2 (one seed each).
DEFAULT_FACTOR_LR_MULT = 0.25


def factor_lr_multipliers(layer: ExpandedLayer, rule: str | float = 'fan_in',
                          chain: str = 'sum') -> list[float]:
    """Learning-rate multiplier of each sub-layer of an expanded layer.

    Args:
        layer: The expanded layer.
        rule: ``'fan_in'``: ``sqrt(f_compact / f_i)``, so that each factor's
            relative Adam step matches the compact layer's; ``'none'``: 1; a
            number: that multiplier for every factor (then ``chain`` is unused).
        chain: How the factors share the compact step: ``'sum'`` divides by the
            number of factors ``L`` (relative changes of aligned updates add
            up), ``'rss'`` by ``sqrt(L)`` (uncorrelated updates).

    Returns:
        One multiplier per sub-layer, first sub-layer first.

    Raises:
        ValueError: On an unknown rule or chain.
    """
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if rule <= 0:
            raise ValueError(f'factor_lr={rule!r} must be > 0')
        return [float(rule)] * len(layer.sublayers)
    if rule not in FACTOR_LR_RULES:
        raise ValueError(f'factor_lr={rule!r} must be one of {FACTOR_LR_RULES} or a '
                         'positive number')
    if chain not in CHAIN_RULES:
        raise ValueError(f'factor_lr_chain={chain!r} must be one of {CHAIN_RULES}')
    fan_ins = layer.factor_fan_ins()
    if rule == 'none':
        return [1.0] * len(fan_ins)
    share = len(fan_ins) if chain == 'sum' else math.sqrt(len(fan_ins))
    compact = layer.compact_fan_in()
    return [math.sqrt(compact / f) / share for f in fan_ins]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ExpandNetOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` plus per-factor learning rates.

    Acts once, when the runner builds the optimizer (before ``init_weights``,
    which only rewrites values in place). Everything of the default
    constructor -- ``paramwise_cfg`` (``custom_keys``, ``norm_decay_mult``,
    ...), ``optim_wrapper`` types, ``clip_grad`` -- works as usual; on top, the
    learning rate of every factor of an expanded layer is multiplied by
    :func:`factor_lr_multipliers`, so parameter schedulers scale it with the
    rest. Non-factor parameters are untouched.

    Config::

        optim_wrapper = dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=0.004, weight_decay=0.01),
            paramwise_cfg=dict(factor_lr='auto', factor_lr_chain='sum'))

    Args:
        optim_wrapper_cfg: As ``DefaultOptimWrapperConstructor``.
        paramwise_cfg: As ``DefaultOptimWrapperConstructor``, plus
            ``factor_lr``: ``'auto'`` (default: ``'fan_in'`` for the adaptive
            optimizers of :data:`ADAPTIVE_OPTIMIZERS`, ``'none'`` otherwise),
            ``'fan_in'``, ``'none'`` or a positive number; and
            ``factor_lr_chain``: ``'sum'`` (default) or ``'rss'``; and
            ``factor_lr_mult``: a further factor on every factor's rate
            (default :data:`DEFAULT_FACTOR_LR_MULT` with the ``'fan_in'``
            rule, 1 otherwise).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        factor_lr = paramwise_cfg.pop('factor_lr', 'auto')
        self.factor_lr_chain = paramwise_cfg.pop('factor_lr_chain', 'sum')
        self.factor_lr_mult = paramwise_cfg.pop('factor_lr_mult', None)
        if self.factor_lr_mult is not None and (isinstance(self.factor_lr_mult, bool)
                or not isinstance(self.factor_lr_mult, (int, float)) or self.factor_lr_mult <= 0):
            raise ValueError(f'paramwise_cfg.factor_lr_mult={self.factor_lr_mult!r} must be a '
                             'positive number')
        # Fail at build time, naming the key, not at the first expanded layer.
        is_number = isinstance(factor_lr, (int, float)) and not isinstance(factor_lr, bool)
        if (is_number and factor_lr <= 0) or (
                not is_number and factor_lr not in FACTOR_LR_RULES + ('auto',)):
            raise ValueError(f'paramwise_cfg.factor_lr={factor_lr!r} must be one of '
                             f"{FACTOR_LR_RULES + ('auto',)} or a positive number")
        if factor_lr == 'auto':
            opt_type = optim_wrapper_cfg.get('optimizer', {}).get('type', '')
            name = opt_type if isinstance(opt_type, str) else getattr(opt_type, '__name__', '')
            factor_lr = 'fan_in' if name.split('.')[-1] in ADAPTIVE_OPTIMIZERS else 'none'
        self.factor_lr = factor_lr
        if self.factor_lr_mult is None:
            # The measured correction belongs to the 'fan_in' rule; 'none' or an
            # explicit number means exactly what it says.
            self.factor_lr_mult = DEFAULT_FACTOR_LR_MULT if factor_lr == 'fan_in' else 1.0
        if self.factor_lr_chain not in CHAIN_RULES:
            raise ValueError(f'paramwise_cfg.factor_lr_chain={self.factor_lr_chain!r} must '
                             f'be one of {CHAIN_RULES}')
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.base_lr is None and self.factor_lr != 'none':
            raise ValueError('ExpandNetOptimWrapperConstructor: optimizer.lr is not set, so '
                             "there is no base rate to scale; set it or use factor_lr='none'")

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optim wrapper with per-parameter groups and scaled factor rates."""
        inner = model.module if hasattr(model, 'module') else model
        multipliers: dict[int, float] = {}
        layers = [(p, m) for p, m in inner.named_modules() if isinstance(m, ExpandedLayer)]
        for _, layer in layers:
            mults = factor_lr_multipliers(layer, self.factor_lr, self.factor_lr_chain)
            for sub, mult in zip(layer.sublayers, mults):
                for param in sub.parameters(recurse=False):
                    multipliers[id(param)] = mult * self.factor_lr_mult
        self._factor_multipliers = multipliers
        # A non-empty paramwise_cfg makes the default constructor build one
        # param group per parameter (add_params), which is where the rates go.
        if not self.paramwise_cfg and multipliers:
            self.paramwise_cfg = {'_expandnet_factor_lr': True}
        try:
            wrapper = super().__call__(model)
        finally:
            self.paramwise_cfg.pop('_expandnet_factor_lr', None)
        if layers:
            values = sorted(set(round(v, 4) for v in multipliers.values()))
            MMLogger.get_current_instance().info(
                f'ExpandNetOptimWrapperConstructor: factor_lr={self.factor_lr!r} '
                f'(chain {self.factor_lr_chain!r}, x{self.factor_lr_mult:g}) on '
                f'{len(multipliers)} factor parameters of {len(layers)} expanded layers; '
                f'multipliers {values[0]}..{values[-1]}')
        return wrapper

    def add_params(self, params: list[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Any = None) -> None:
        """The default per-parameter groups, with factor learning rates scaled."""
        start = len(params)
        super().add_params(params, module, prefix=prefix, is_dcn_module=is_dcn_module)
        if prefix:  # only the outermost call rescales, once
            return
        base_lr = self.base_lr
        for group in params[start:]:
            (param,) = group['params']
            mult = self._factor_multipliers.get(id(param))
            if mult is not None:
                group['lr'] = group.get('lr', base_lr) * mult
