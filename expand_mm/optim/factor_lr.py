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
4.4-4.7x as far as a kaiming-initialised compact conv moves with the rule alone.

Over whole trainings the step that works is not a fixed share of the compact
one: the digits detector (AdamW lr 0.004) trained best with factor base rates
``lr * mult`` of 1e-3 to 2e-3, and the digits U-Net (AdamW lr 0.016) with 0.8e-3
to 1.6e-3, where 4e-3 collapsed it (``docs/studies.md``). Matching the compact
step -- once at the start (``'calibrated'``) or at every step (tried, seed 0:
det 25.4 and seg 22.5 against 31.5 and 52.4) -- trains worse on both. So the
default base rate of the factors is ``min(lr, DEFAULT_FACTOR_BASE_RATE)``, an
absolute ceiling measured on those two tasks, not derived; ``factor_lr_mult``
overrides it. SGD, whose step scales with the gradient, does not need any of it.

The fan-in shape leaves the composed kernel's step depending on the chain: one
sign step at unit rate moves an orthogonal CL chain's kernel by 0.31 per entry
at r = 2, 0.50 at r = 4, 0.89 at r = 8, a depthwise chain's by 0.30-0.41.
``'kernel_step'`` divides the shape by that measured response
(:mod:`~expand_mm.optim.step_response`), so one step at rate ``b`` moves every
composed kernel by ``b``; its ceiling, ``DEFAULT_KERNEL_STEP``, gives r = 4 CL
chains the ``'fan_in'`` default's rates. Opt-in: on the digits tasks it trains
distilled r = 2 models better and plain ones worse (``docs/studies.md``).
"""
from __future__ import annotations

import copy
import difflib

import math
from typing import Any

from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn
from torch.optim import Optimizer

from ..compat import type_name
from ..errors import ConfigError, SetupError
from ..layers import ExpandedLayer
from ..surgery import expanded_layers
from .product_decay import (FACTOR_BASE_LR_KEY, FACTOR_LR_MULT_KEY, PRODUCT_DECAY_KEY,
                            ProductWeightDecay, WeightDecayOnCheck, check_weight_decay_on,
                            factor_weights)
from .step_response import orthogonal_step_response

FACTOR_LR_RULES = ('fan_in', 'kernel_step', 'calibrated', 'none')
# Optimizers whose step size does not scale with the gradient's magnitude (per
# entry or per tensor): the ones the fan-in rule is derived for. 'auto' uses it
# for these and leaves the rates alone for the others (SGD: the paper's setting).
ADAPTIVE_OPTIMIZERS = ('Adam', 'AdamW', 'Adamax', 'NAdam', 'RAdam', 'Adagrad', 'Adadelta',
                       'RMSprop', 'Lion', 'Adafactor')
CHAIN_RULES = ('sum', 'rss')
# Param-group key of the calibrated rule: CALIBRATION_PENDING until the
# hook has scaled the group, then the layer's scale (saved with the optimizer,
# so a resumed run keeps its rates).
CALIBRATION_KEY = 'factor_lr_calibration'
CALIBRATION_PENDING = 'pending'
# Ceiling of the factors' base rate under the 'fan_in' rule (see the module
# docstring). Calibration record (seed 0 each; projects/digits/README.md):
# detector, AdamW lr 0.004, mAP 31.5 / 31.3 at multipliers 0.25 / 0.375
# (compact 29.1; 22.1 at 1 and 26.8 at 0.1 in older demo runs); distilled
# 41.2 / 42.0 at 0.25 / 0.375;
# U-Net, AdamW lr 0.016, mIoU 21.3 / 33.4 / 52.5 / 52.9 at 0.5 / 0.25 / 0.1 /
# 0.05 (compact 44.3 then). 1.5e-3 is 0.375 and 0.094 of those rates.
DEFAULT_FACTOR_BASE_RATE = 1.5e-3
# Ceiling of the composed kernel's per-entry step under the 'kernel_step' rule:
# the 'fan_in' ceiling times the response of the chains it was measured on
# (orthogonal CL r=4 3x3 chains of both digits models: 0.48..0.53 per unit rate),
# so that rule reproduces the 'fan_in' default at r = 4 and keeps that kernel
# step at other ratios (r = 2 responds 0.31, r = 8 0.89: docs/studies.md).
DEFAULT_KERNEL_STEP = 7.5e-4


# The ceiling each rule's default multiplier puts on what ``optimizer.lr`` would give.
RULE_CEILINGS = {'fan_in': DEFAULT_FACTOR_BASE_RATE, 'kernel_step': DEFAULT_KERNEL_STEP}


def default_factor_lr_mult(lr: float, rule: str = 'fan_in') -> float:
    """The multiplier a rule uses when ``factor_lr_mult`` is not set.

    ``min(1, ceiling / lr)`` with the rule's ceiling (:data:`RULE_CEILINGS`):
    under ``'fan_in'`` the factors' base rate is the compact rate, at most
    :data:`DEFAULT_FACTOR_BASE_RATE`; under ``'kernel_step'`` one step moves the
    composed kernel's entries by ``min(lr, DEFAULT_KERNEL_STEP)`` (RMS). Other
    rules: 1.
    """
    ceiling = RULE_CEILINGS.get(rule)
    return min(1.0, ceiling / lr) if ceiling is not None and lr > 0 else 1.0


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_factor_lr(rule: Any, chain: Any, rules: tuple[str, ...] = FACTOR_LR_RULES) -> None:
    """Raise ``ValueError`` naming the ``paramwise_cfg`` key of a bad setting.

    Args:
        rule: ``factor_lr``: one of ``rules`` or a positive number.
        chain: ``factor_lr_chain``: one of :data:`CHAIN_RULES`.
        rules: The accepted rule names.
    """
    if not (_is_positive_number(rule) or (isinstance(rule, str) and rule in rules)):
        raise ConfigError(f'paramwise_cfg.factor_lr={rule!r} must be one of {rules} or a '
                          'positive number')
    if chain not in CHAIN_RULES:
        raise ConfigError(f'paramwise_cfg.factor_lr_chain={chain!r} must be one of '
                          f'{CHAIN_RULES}')


def factor_lr_multipliers(layer: ExpandedLayer, rule: str | float = 'fan_in',
                          chain: str = 'sum') -> list[float]:
    """Learning-rate multiplier of each sub-layer of an expanded layer.

    Args:
        layer: The expanded layer.
        rule: ``'fan_in'``: ``sqrt(f_compact / f_i)``, so that each factor's
            relative Adam step matches the compact layer's; ``'kernel_step'``:
            that shape divided by the layer's measured response
            (:func:`~expand_mm.optim.step_response.orthogonal_step_response`),
            so that one Adam step at unit rate moves the composed kernel's
            entries by 1 (RMS) at any ratio or strategy; ``'calibrated'``:
            the same shape, which :mod:`~expand_mm.optim.lr_calibration`
            scales per layer once training starts; ``'none'``: 1; a number:
            that multiplier for every factor (then ``chain`` is unused).
        chain: How the factors share the compact step: ``'sum'`` divides by the
            number of factors ``L`` (relative changes of aligned updates add
            up), ``'rss'`` by ``sqrt(L)`` (uncorrelated updates).

    Returns:
        One multiplier per sub-layer, first sub-layer first.

    Raises:
        ValueError: On an unknown rule or chain.
    """
    check_factor_lr(rule, chain)
    if rule not in ('fan_in', 'kernel_step', 'calibrated'):
        return [1.0 if rule == 'none' else float(rule)] * len(layer.sublayers)
    fan_ins = layer.factor_fan_ins()
    share = len(fan_ins) if chain == 'sum' else math.sqrt(len(fan_ins))
    compact = layer.compact_fan_in()
    shares = [math.sqrt(compact / f) / share for f in fan_ins]
    if rule != 'kernel_step':
        return shares
    response = orthogonal_step_response(layer, shares)
    return [m / response for m in shares]


# What DefaultOptimWrapperConstructor reads (mmengine 0.10), and what this one adds.
STOCK_PARAMWISE_KEYS = ('custom_keys', 'bias_lr_mult', 'bias_decay_mult', 'norm_decay_mult',
                        'dwconv_decay_mult', 'flat_decay_mult', 'bypass_duplicate',
                        'dcn_offset_lr_mult')
EXPANDNET_PARAMWISE_KEYS = ('factor_lr', 'factor_lr_chain', 'factor_lr_mult', 'weight_decay_on')


def check_paramwise_keys(paramwise_cfg: dict) -> None:
    """Refuse ``paramwise_cfg`` keys that no constructor reads, naming the nearest one.

    MMEngine's constructor ignores unknown keys, so a misspelled
    ``factor_lr_mult`` would train at the default rates without a word.
    """
    known = STOCK_PARAMWISE_KEYS + EXPANDNET_PARAMWISE_KEYS
    for key in paramwise_cfg:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f'paramwise_cfg.{key} is not an option'
                              + (f'; did you mean {near[0]!r}?' if near else '')
                              + f' ExpandNetOptimWrapperConstructor reads {", ".join(known)}')


class FactorRateCheck:
    """Optimizer ``load_state_dict`` pre-hook: say when a resume keeps other factor rates.

    Resuming restores the optimizer's param groups as saved, learning rates
    included (MMEngine's behaviour for every setting), so a changed
    ``factor_lr_mult`` / ``factor_lr`` / ``optimizer.lr`` in the config has no
    effect on a resumed run while the constructor's log shows the new
    multipliers. This compares each group's rate as built (``initial_lr``,
    set by the schedulers, else ``lr``) with the saved one and logs a warning
    with both when they differ; the state then loads unchanged.

    Args:
        optimizer: The torch optimizer that will load the state.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.handle = optimizer.register_load_state_dict_pre_hook(self)

    def __call__(self, optimizer: Optimizer, state_dict: dict) -> None:
        """Warn if ``state_dict``'s group rates differ from the ones just built."""
        saved = state_dict.get('param_groups', [])
        built = optimizer.param_groups
        if len(saved) != len(built):
            return  # torch refuses it itself, naming the counts
        ratios = []
        for old, new in zip(saved, built):
            old_lr = old.get('initial_lr', old.get('lr'))
            new_lr = new.get('initial_lr', new.get('lr'))
            if isinstance(old_lr, (int, float)) and isinstance(new_lr, (int, float)) and new_lr:
                ratios.append(float(old_lr) / float(new_lr))
        changed = [r for r in ratios if abs(r - 1.0) > 1e-6]
        if changed:
            MMLogger.get_current_instance().warning(
                f'ExpandNetOptimWrapperConstructor: the optimizer state being loaded has other '
                f'learning rates in {len(changed)} of {len(ratios)} param groups (saved / '
                f'configured: {min(changed):.4g}..{max(changed):.4g}); a resume keeps the saved '
                'ones, so a changed factor_lr_mult, factor_lr or optimizer.lr does not apply. '
                'To train with the new rates, start from the checkpoint\'s weights with '
                'load_from=<checkpoint> and resume=False (a fresh optimizer)')


class PendingCalibrationCheck:
    """Optimizer step pre-hook: refuse to train factor groups still awaiting calibration.

    With ``factor_lr='calibrated'`` the rates are only the fan-in shape until
    :class:`~expand_mm.hooks.FactorLRCalibrationHook` scales them; without
    the hook, training would silently run at uncalibrated rates. Removes
    itself after the first step it lets through.

    Args:
        optimizer: The torch optimizer whose groups were marked.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.handle = optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Raise while a group is pending; otherwise remove the hook."""
        if any(g.get(CALIBRATION_KEY) == CALIBRATION_PENDING for g in optimizer.param_groups):
            raise SetupError("paramwise_cfg.factor_lr='calibrated' needs FactorLRCalibrationHook "
                             "to scale the factor rates before training; add "
                             "custom_hooks=[dict(type='FactorLRCalibrationHook')]")
        self.handle.remove()


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ExpandNetOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` plus per-factor learning rates and product decay.

    Acts once, when the runner builds the optimizer (before ``init_weights``,
    which only rewrites values in place). Everything of the default
    constructor -- ``paramwise_cfg`` (``custom_keys``, ``norm_decay_mult``,
    ...), ``optim_wrapper`` types, ``clip_grad`` -- works as usual; on top, the
    learning rate of every factor of an expanded layer is multiplied by
    :func:`factor_lr_multipliers`, so parameter schedulers scale it with the
    rest. Non-factor parameters are untouched. With
    ``weight_decay_on='product'`` the factor weights' decay is moved onto the
    composed kernel of each expanded layer (see
    :mod:`expand_mm.optim.product_decay`): their groups get ``weight_decay=0``
    and a :class:`~expand_mm.optim.ProductWeightDecay` step pre-hook, exposed
    as the wrapper's ``product_weight_decay`` attribute, applies it once per
    optimizer step. The default ``'factors'`` adds nothing to the step. Each
    factor's own param group records its rate multiplier under
    ``factor_lr_mult`` and its rate before it under ``factor_base_lr`` (read
    by the schedule check). In either setting, when
    factor weights are trained, a
    :class:`~expand_mm.optim.product_decay.WeightDecayOnCheck` on the
    optimizer's ``load_state_dict`` refuses (``resume``) an optimizer state
    saved under the other setting, which would otherwise silently replace the
    configured decay regime.

    Config::

        optim_wrapper = dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=0.004, weight_decay=0.01),
            paramwise_cfg=dict(factor_lr='auto', factor_lr_chain='sum',
                               weight_decay_on='factors'))

    Args:
        optim_wrapper_cfg: As ``DefaultOptimWrapperConstructor``.
        paramwise_cfg: As ``DefaultOptimWrapperConstructor``, plus
            ``factor_lr``: ``'auto'`` (default: ``'fan_in'`` for the adaptive
            optimizers of :data:`ADAPTIVE_OPTIMIZERS`, ``'none'`` otherwise),
            ``'fan_in'``, ``'kernel_step'`` (the fan-in shape normalised by each
            layer's measured step response, see :func:`factor_lr_multipliers`),
            ``'calibrated'`` (per-layer scales measured when
            training starts, see :mod:`~expand_mm.optim.lr_calibration`; needs
            ``FactorLRCalibrationHook``), ``'none'`` or a positive number; and
            ``factor_lr_chain``: ``'sum'`` (default) or ``'rss'``; and
            ``factor_lr_mult``: a further factor on every factor's rate
            (default :func:`default_factor_lr_mult` of ``optimizer.lr`` and
            the rule: a ceiling under ``'fan_in'`` and ``'kernel_step'``, 1
            otherwise); and ``weight_decay_on``: ``'factors'``
            (default: each factor decays as any parameter) or ``'product'``
            (the composed kernel decays as the compact one would; coupled-L2
            and decoupled optimizers, see
            :mod:`~expand_mm.optim.product_decay`).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        check_paramwise_keys(paramwise_cfg)
        factor_lr = paramwise_cfg.pop('factor_lr', 'auto')
        self.factor_lr_chain = paramwise_cfg.pop('factor_lr_chain', 'sum')
        factor_lr_mult = paramwise_cfg.pop('factor_lr_mult', None)
        self.weight_decay_on = paramwise_cfg.pop('weight_decay_on', 'factors')
        check_weight_decay_on(self.weight_decay_on)
        # Fail at build time, naming the key, not at the first expanded layer.
        check_factor_lr(factor_lr, self.factor_lr_chain, FACTOR_LR_RULES + ('auto',))
        if factor_lr_mult is not None and not _is_positive_number(factor_lr_mult):
            raise ConfigError(f'paramwise_cfg.factor_lr_mult={factor_lr_mult!r} must be a '
                              'positive number')
        self._factor_lr_given = factor_lr
        self._optimizer_name = type_name(
            optim_wrapper_cfg.get('optimizer', {}).get('type', '')) or '?'
        if factor_lr == 'auto':
            factor_lr = 'fan_in' if self._optimizer_name in ADAPTIVE_OPTIMIZERS else 'none'
        self.factor_lr = factor_lr
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.base_lr is None and self.factor_lr != 'none':
            raise ConfigError('ExpandNetOptimWrapperConstructor: optimizer.lr is not set, so '
                              "there is no base rate to scale; set it or use factor_lr='none'")
        # The measured ceilings belong to the 'fan_in' and 'kernel_step' rules;
        # 'calibrated' measures its own per layer; 'none' or a number means what it says.
        self.factor_lr_mult = factor_lr_mult if factor_lr_mult is not None else (
            default_factor_lr_mult(self.base_lr, factor_lr))
        self._factor_multipliers: dict[int, float] = {}
        self._all_factor_multipliers: dict[int, float] = {}

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optim wrapper with per-parameter groups and scaled factor rates.

        When every multiplier is 1 (``'none'``, e.g. SGD under ``'auto'``) this
        is exactly the default constructor: no per-parameter groups are forced.
        """
        inner = model.module if hasattr(model, 'module') else model
        layers = expanded_layers(inner)
        multipliers: dict[int, float] = {}
        # The calibrated scale absorbs how the factors share the step.
        chain = 'sum' if self.factor_lr == 'calibrated' else self.factor_lr_chain
        for _, layer in layers:
            mults = factor_lr_multipliers(layer, self.factor_lr, chain)
            for sub, mult in zip(layer.sublayers, mults):
                for param in sub.parameters(recurse=False):
                    multipliers[id(param)] = mult * self.factor_lr_mult
        self._all_factor_multipliers = multipliers
        _refuse_custom_keys_of_compact_parameters(self.paramwise_cfg, inner, layers)
        self._factor_multipliers = {k: v for k, v in multipliers.items() if v != 1.0}
        product = self.weight_decay_on == 'product'
        if product and not layers:
            raise ConfigError("paramwise_cfg.weight_decay_on='product': the model has no "
                              "expanded layer; use model=dict(type='ExpandNet', ...) or "
                              "weight_decay_on='factors'")
        if (self._factor_multipliers or product) and not self.paramwise_cfg:
            # The rates (and the product decay's keys) go into the per-parameter
            # groups that add_params builds, which the default constructor does
            # for any non-empty paramwise_cfg. Without a paramwise_cfg it passes
            # model.parameters(), which lists a shared module's parameters once;
            # bypass_duplicate=True does the same for the groups.
            self.paramwise_cfg = dict(bypass_duplicate=True)
        wrapper = super().__call__(model)
        if product:
            self._install_product_decay(wrapper, layers)
        optimized = {id(p) for g in wrapper.optimizer.param_groups for p in g['params']}
        # Only factor weights the optimizer trains carry the regime in their
        # groups: with none (frozen, e.g. an expanded teacher) both settings
        # save the same groups and a check would refuse a matching resume.
        if any(id(p) in optimized for _, layer in layers for p in factor_weights(layer)):
            WeightDecayOnCheck(wrapper.optimizer, self.weight_decay_on)
        if any(key in optimized for key in self._factor_multipliers):  # none when all frozen
            FactorRateCheck(wrapper.optimizer)
        if self.factor_lr == 'calibrated':
            self._mark_calibration_pending(wrapper.optimizer)
        if layers:
            values = sorted(multipliers.values())
            rule = (f"'auto' -> {self.factor_lr!r} ({self._optimizer_name})"
                    if self._factor_lr_given == 'auto' else repr(self.factor_lr))
            MMLogger.get_current_instance().info(
                f'ExpandNetOptimWrapperConstructor: factor_lr={rule} '
                f'(chain {self.factor_lr_chain!r}, x{self.factor_lr_mult:g}) on '
                f'{len(multipliers)} factor parameters of {len(layers)} expanded layers; '
                f'multipliers {values[0]:.4g}..{values[-1]:.4g}')
        return wrapper

    def _mark_calibration_pending(self, optimizer: Optimizer) -> None:
        """Mark every factor group for :class:`~expand_mm.hooks.FactorLRCalibrationHook`.

        The scale of each layer is measured from the values training starts
        from, which exist only after ``init_weights`` and ``load_from`` -- both
        run after the optimizer is built.
        """
        marked = False
        for group in optimizer.param_groups:
            if any(id(p) in self._all_factor_multipliers for p in group['params']):
                group[CALIBRATION_KEY] = CALIBRATION_PENDING
                marked = True
        if marked:
            PendingCalibrationCheck(optimizer)

    def _install_product_decay(self, wrapper: OptimWrapper,
                               layers: list[tuple[str, ExpandedLayer]]) -> None:
        """Zero the factor weights' decay, keep it in their groups, hook the optimizer.

        Reads each factor group's ``weight_decay`` after the optimizer filled in
        its defaults (AdamW decays by default), so the decay moved onto the
        product is what the factor -- and so the compact weight -- would have had.
        """
        optimizer = wrapper.optimizer
        groups = {id(p): g for g in optimizer.param_groups for p in g['params']}
        moved: list[float] = []
        for path, layer in layers:
            names = {id(p): n for n, p in layer.named_parameters()}
            for param in factor_weights(layer):
                group = groups.get(id(param))
                if group is None:  # frozen or left out of the optimizer
                    continue
                if len(group['params']) != 1:
                    raise SetupError(
                        f"paramwise_cfg.weight_decay_on='product': factor "
                        f'{path}.{names[id(param)]} shares a param group with '
                        f'{len(group["params"]) - 1} other parameters; it needs a group of '
                        'its own')
                decay = float(group.get('weight_decay') or 0.0)
                group[PRODUCT_DECAY_KEY] = decay  # add_params recorded FACTOR_LR_MULT_KEY
                if 'weight_decay' in group:
                    group['weight_decay'] = 0.0
                moved.append(decay)
        logger = MMLogger.get_current_instance()
        if not any(moved):
            logger.info("ExpandNetOptimWrapperConstructor: weight_decay_on='product', but "
                        'no factor weight has weight decay: nothing to move')
            return
        hook = ProductWeightDecay(optimizer, layers)
        wrapper.product_weight_decay = hook
        logger.info(
            f"ExpandNetOptimWrapperConstructor: weight_decay_on='product' ({hook.style} "
            f'{type(optimizer).__name__} decay): {len(moved)} factor weights of '
            f'{len(layers)} expanded layers decay through their composed kernel '
            f'(weight decay {min(moved):.4g}..{max(moved):.4g}); factor biases keep '
            'their own decay')

    def add_params(self, params: list[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Any = None) -> None:
        """The default per-parameter groups, with factor learning rates scaled.

        A wholly frozen sub-module (a distiller's teacher) is left out at once:
        the default constructor would skip each of its parameters with a warning.
        """
        if not any(p.requires_grad for p in module.parameters()):
            return
        start = len(params)
        if isinstance(module, ExpandedLayer) and (
                sum(1 for _ in module.parameters())
                == sum(1 for _ in module.sublayers.parameters())):
            self._add_expanded_layer(params, module, prefix, is_dcn_module)
        else:
            super().add_params(params, module, prefix=prefix, is_dcn_module=is_dcn_module)
        if prefix:  # the recursion's outermost call rescales, once
            return
        for group in params[start:]:
            (param,) = group['params']
            mult = self._all_factor_multipliers.get(id(param))
            if mult is None:
                continue
            rate = group.get('lr', self.base_lr)
            if mult != 1.0:
                group['lr'] = rate * mult
            # Recorded for the schedule check: a custom_keys lr_mult is the user's,
            # and schedulers that set absolute rates (OneCycleLR) overwrite what
            # the rate started as. The rate before the multiplier tells a later
            # scaling of the groups (--auto-scale-lr) apart from a custom_keys one.
            group[FACTOR_LR_MULT_KEY] = mult
            if rate is not None:
                group[FACTOR_BASE_LR_KEY] = rate

    def _add_expanded_layer(self, params: list[dict], layer: ExpandedLayer, prefix: str,
                            is_dcn_module: Any) -> None:
        """Add an expanded layer's factors under the rules of the compact layer.

        mmengine decides per module: ``dwconv_decay_mult`` for a conv with
        ``in_channels == groups``, ``dcn_offset_lr_mult`` for the children of a
        deformable conv. Inside a chain a factor passes the depthwise test or
        not regardless of the compact conv, and no factor is a DCN's child, so
        each conv factor is presented as the compact conv: a shallow copy
        sharing the factor's parameters, with the compact ``in_channels`` and
        ``groups`` (the only attributes the rule reads), and the DCN flag the
        layer itself got.
        """
        for index, sub in enumerate(layer.sublayers):
            sub_prefix = f'{prefix}.{_sublayer_path(layer, index)}' if prefix \
                else _sublayer_path(layer, index)
            if isinstance(sub, nn.Conv2d) and hasattr(layer, 'groups'):
                stand_in = copy.copy(sub)  # shares the Parameters, not the attributes
                stand_in.in_channels, stand_in.groups = layer.in_channels, layer.groups
                sub = stand_in
            # Through the override: a frozen factor is left out without a warning.
            self.add_params(params, sub, prefix=sub_prefix, is_dcn_module=is_dcn_module)


def _refuse_custom_keys_of_compact_parameters(paramwise_cfg: dict | None, model: nn.Module,
                                              layers: list[tuple[str, ExpandedLayer]]) -> None:
    """Refuse a ``custom_keys`` entry that named a parameter of a now-expanded layer.

    mmengine matches a key as a substring of parameter names; a key such as
    ``'backbone.stem.conv.weight'`` (or just ``'stem.conv.weight'``) matched
    the compact conv's weight, but the layer's parameters are now its
    factors' (``...conv.convs.1.weight``), so the rule would silently apply
    to nothing. A key that still matches some parameter is left alone.
    """
    custom_keys = (paramwise_cfg or {}).get('custom_keys') or {}
    names = [name for name, _ in model.named_parameters()]
    for key in custom_keys:
        if any(key in name for name in names):
            continue
        for path, layer in layers:
            compact_names = (f'{path}.weight', f'{path}.bias')
            if any(key in name for name in compact_names):
                factor_example = f'{path}.{_sublayer_path(layer, 0)}.weight'
                raise ConfigError(
                    f'paramwise_cfg.custom_keys: {key!r} names a parameter of {path!r}, an '
                    f'expanded layer whose parameters are now its factors\' '
                    f'({factor_example}, ...), so it would match nothing; use the module '
                    f'path {path!r} to reach every factor')


def _sublayer_path(layer: ExpandedLayer, index: int) -> str:
    """Path of ``layer.sublayers[index]`` inside ``layer`` (e.g. ``'convs.1'``)."""
    target = layer.sublayers[index]
    for name, module in layer.named_modules():
        if module is target:
            return name
    raise LookupError(f'{layer._describe()}: sub-layer {index} is not among its modules')
