"""Warn when a learning-rate schedule undoes the per-factor learning rates.

Why: :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor` gives the
factors of every expanded layer their own, scaled learning rate (under Adam /
AdamW often 0.05-0.25 of the base rate). MMEngine's schedulers multiply every
group's rate alike, which keeps those ratios -- except the ones that end at an
absolute floor: ``CosineAnnealingLR(eta_min=...)``, ``CosineRestartLR`` with
``eta_min`` and ``PolyLR(eta_min=...)`` drive every group towards the same
``eta_min``, so near the end of the schedule a factor group runs at up to
``1 / multiplier`` times its intended rate, and the expanded model trains late
in the schedule like a compact one at a larger rate. ``eta_min_ratio`` (cosine
schedulers) ends each group at the same fraction of its own rate instead;
``eta_min=0`` is safe everywhere. ``ReduceOnPlateauLR(min_value=...)`` is such
a floor too, and ``OneCycleLR`` with one number as ``eta_max`` sets every
group's rates from that number, undoing the scaling from the first step.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

from mmengine.optim import OptimWrapper, OptimWrapperDict
from torch import nn

from ..surgery import expanded_layers
from .product_decay import FACTOR_BASE_LR_KEY, FACTOR_LR_MULT_KEY

# Relative tolerance under which a factor group's rate counts as the base rate.
_SAME_RATE_RTOL = 1e-6


def flat_schedulers(param_schedulers: Any) -> list:
    """The scheduler objects of a runner's ``param_schedulers`` (list, dict of lists or None)."""
    if param_schedulers is None:
        return []
    if isinstance(param_schedulers, dict):
        return [s for value in param_schedulers.values() for s in flat_schedulers(value)]
    if isinstance(param_schedulers, (list, tuple)):
        return list(param_schedulers)
    return [param_schedulers]


def optimizers_of(optim_wrapper: Any) -> list:
    """The torch optimizers behind an ``OptimWrapper`` / ``OptimWrapperDict``."""
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [w.optimizer for w in optim_wrapper.values()]
    if isinstance(optim_wrapper, OptimWrapper):
        return [optim_wrapper.optimizer]
    return []


def _initial_rate(group: dict) -> float:
    """The rate a param group started the schedule at (``initial_lr``, set by the
    schedulers; ``lr`` before any scheduler is built)."""
    return float(group.get('initial_lr', group['lr']))


def _factor_multiplier(group: dict, base: float) -> float:
    """The multiplier the constructor gave a factor group's rate.

    Recorded in the group; a group saved before it was (an older checkpoint)
    reads it from the rate the group started with (``initial_lr``, set by
    the schedulers), which a scheduler that sets absolute rates overwrites.
    """
    if FACTOR_LR_MULT_KEY in group:
        return float(group[FACTOR_LR_MULT_KEY])
    return _initial_rate(group) / base


def _compact_rate(optimizer: Any, factor_groups: list[dict]) -> float:
    """The rate of the groups no multiplier touched, as the schedule starts.

    That is ``optimizer.lr`` times any scaling of the groups after the build:
    ``--auto-scale-lr`` scales every group's rate, not
    ``optimizer.defaults['lr']``. A factor group records the rate it had before
    its multiplier (``optimizer.lr`` times any ``custom_keys`` ``lr_mult``), so
    its starting rate over that rate times the multiplier is the later scaling,
    whatever ``lr_mult`` the user gave it. Groups saved before that rate was
    recorded (an older checkpoint) fall back to the most common
    ``rate / multiplier``, which a ``lr_mult`` on most expanded layers skews.

    Args:
        optimizer: The torch optimizer.
        factor_groups: Its factor groups, none at rate 0.

    Returns:
        The rate that an ``eta_min_ratio`` should end at ``eta_min``.
    """
    base = float(optimizer.defaults['lr'])
    scalings = [_initial_rate(g) / (float(g[FACTOR_BASE_LR_KEY]) * float(g[FACTOR_LR_MULT_KEY]))
                for g in factor_groups
                if g.get(FACTOR_BASE_LR_KEY) and g.get(FACTOR_LR_MULT_KEY)]
    if scalings:
        return base * statistics.median(scalings)
    compact_rates = [_initial_rate(g) / _factor_multiplier(g, base) for g in factor_groups]
    return max(set(compact_rates), key=compact_rates.count)


def _floor_problem(scheduler: Any, base: float, groups: list) -> tuple[str, str] | None:
    """``(setting, remedy)`` when ``scheduler`` floors the param ``groups`` at rates that
    are not the same fraction of each group's own rate."""
    name = type(scheduler).__name__
    eta_min = getattr(scheduler, 'eta_min', None)
    if eta_min and getattr(scheduler, 'eta_min_ratio', None) is None:
        ratio = (f'eta_min_ratio={eta_min / base:.4g} (the same end rate for the base '
                 'groups)')
        if hasattr(scheduler, 'eta_min_ratio'):
            instead = f'{ratio} or eta_min=0'
        elif name == 'PolyLR':
            instead = f"type='PolyLRRatio' (expand_mm) with {ratio}, or eta_min=0"
        else:
            instead = 'eta_min=0'
        return f'{name}, eta_min={eta_min:g}', instead
    min_values = getattr(scheduler, 'min_values', None)  # ReduceOnPlateauLR
    if isinstance(min_values, (list, tuple)) and any(v > 0 for v in min_values):
        # One value per group (MMEngine may append one for the base settings): a list
        # proportional to the groups' own rates keeps them.
        # A group at rate 0 (a custom_keys lr_mult=0 freezes it) stays there.
        fractions = [value / _initial_rate(group)
                     for value, group in zip(min_values, groups) if _initial_rate(group) > 0]
        if fractions and max(fractions) - min(fractions) > _SAME_RATE_RTOL * max(fractions):
            return f'{name}, min_value={max(min_values):g}', 'min_value=0'
    return None


def absolute_floor_problems(model: nn.Module, optim_wrapper: Any,
                            param_schedulers: Iterable | dict | None) -> list[str]:
    """Describe every lr scheduler whose absolute rates undo scaled factor rates.

    Those are an absolute floor (``eta_min``, ``ReduceOnPlateauLR``'s
    ``min_value``) and ``OneCycleLR``'s one ``eta_max`` for every group.

    Args:
        model: The trained model (its expanded layers' factors are looked up).
        optim_wrapper: The runner's built ``OptimWrapper`` or ``OptimWrapperDict``.
        param_schedulers: The runner's built parameter schedulers.

    Returns:
        One message per offending scheduler (empty when none): it names the
        scheduler, the setting, how far off the factor groups get, and what
        to use instead.
    """
    factor_ids = {id(p) for _, layer in expanded_layers(model)
                  for sub in layer.sublayers for p in sub.parameters(recurse=False)}
    if not factor_ids:
        return []
    problems = []
    for optimizer in optimizers_of(optim_wrapper):
        base = optimizer.defaults.get('lr')
        if not base:
            continue
        # A factor group at rate 0 (under a custom_keys lr_mult=0) has no scaling to
        # lose: a floor does to it what it does to a compact model's frozen group.
        factor_groups = [g for g in optimizer.param_groups
                         if any(id(p) in factor_ids for p in g['params'])
                         and _initial_rate(g) > 0]
        multipliers = [m for m in (_factor_multiplier(g, base) for g in factor_groups)
                       if abs(m - 1.0) > _SAME_RATE_RTOL]
        if not multipliers:
            continue
        base = _compact_rate(optimizer, factor_groups)
        scaled = (f'{len(multipliers)} factor groups of the expanded layers, whose rates '
                  'ExpandNetOptimWrapperConstructor scaled by '
                  f'{min(multipliers):.3g}..{max(multipliers):.3g}')
        for index, scheduler in enumerate(flat_schedulers(param_schedulers)):
            # MMEngine schedulers hold the OptimWrapper or the torch optimizer.
            target = getattr(scheduler, 'optimizer', None)
            if optimizer not in (target, getattr(target, 'optimizer', None)):
                continue
            if getattr(scheduler, 'param_name', None) != 'lr':
                continue
            eta_max = getattr(scheduler, 'eta_max', None)
            if hasattr(scheduler, 'div_factor') and isinstance(eta_max, (int, float)):
                problems.append(
                    f'param_scheduler[{index}] ({type(scheduler).__name__}, '
                    f'eta_max={eta_max:g}) sets every param group\'s rates from the same '
                    f'eta_max, so the {scaled}, lose that scaling from the first step (up to '
                    f'{1 / min(multipliers):.3g}x their intended rate). Give eta_max one '
                    'value per param group, or use schedulers that scale each group\'s own '
                    'rate (e.g. LinearLR warm-up + CosineAnnealingLR with eta_min_ratio).')
                continue
            floor = _floor_problem(scheduler, base, optimizer.param_groups)
            if floor is None:
                continue
            setting, instead = floor
            problems.append(
                f'param_scheduler[{index}] ({setting}) drives every param group to the same '
                f'absolute learning rate, so the {scaled}, lose that scaling towards its end '
                f'(up to {1 / min(multipliers):.3g}x their intended rate). Use {instead}.')
    return problems
