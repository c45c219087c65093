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
``eta_min=0`` is safe everywhere.
"""
from __future__ import annotations

from typing import Any, Iterable

from mmengine.optim import OptimWrapper, OptimWrapperDict
from torch import nn

from ..surgery import expanded_layers

# Relative tolerance under which a factor group's rate counts as the base rate.
_SAME_RATE_RTOL = 1e-6


def _flat_schedulers(param_schedulers: Any) -> list:
    """The scheduler objects of a runner's ``param_schedulers`` (list, dict of lists or None)."""
    if param_schedulers is None:
        return []
    if isinstance(param_schedulers, dict):
        return [s for value in param_schedulers.values() for s in _flat_schedulers(value)]
    if isinstance(param_schedulers, (list, tuple)):
        return list(param_schedulers)
    return [param_schedulers]


def _optimizers(optim_wrapper: Any) -> list:
    """The torch optimizers behind an ``OptimWrapper`` / ``OptimWrapperDict``."""
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [w.optimizer for w in optim_wrapper.values()]
    if isinstance(optim_wrapper, OptimWrapper):
        return [optim_wrapper.optimizer]
    return []


def _base_rate(group: dict) -> float:
    # Schedulers record the rate a group started with as 'initial_lr'.
    return float(group.get('initial_lr', group['lr']))


def absolute_floor_problems(model: nn.Module, optim_wrapper: Any,
                            param_schedulers: Iterable | dict | None) -> list[str]:
    """Describe every lr scheduler whose absolute ``eta_min`` undoes scaled factor rates.

    Args:
        model: The trained model (its expanded layers' factors are looked up).
        optim_wrapper: The runner's built ``OptimWrapper`` or ``OptimWrapperDict``.
        param_schedulers: The runner's built parameter schedulers.

    Returns:
        One message per offending scheduler (empty when none): it names the
        scheduler, its ``eta_min``, how far off the factor groups end, and
        what to use instead.
    """
    factor_ids = {id(p) for _, layer in expanded_layers(model)
                  for sub in layer.sublayers for p in sub.parameters(recurse=False)}
    if not factor_ids:
        return []
    problems = []
    for optimizer in _optimizers(optim_wrapper):
        base = optimizer.defaults.get('lr')
        if not base:
            continue
        factor_groups = [g for g in optimizer.param_groups
                         if any(id(p) in factor_ids for p in g['params'])]
        multipliers = [_base_rate(g) / base for g in factor_groups
                       if abs(_base_rate(g) / base - 1.0) > _SAME_RATE_RTOL]
        if not multipliers:
            continue
        for index, scheduler in enumerate(_flat_schedulers(param_schedulers)):
            # MMEngine schedulers hold the OptimWrapper or the torch optimizer.
            target = getattr(scheduler, 'optimizer', None)
            if optimizer not in (target, getattr(target, 'optimizer', None)):
                continue
            eta_min = getattr(scheduler, 'eta_min', None)
            if (getattr(scheduler, 'param_name', None) != 'lr' or not eta_min
                    or getattr(scheduler, 'eta_min_ratio', None) is not None):
                continue
            name = type(scheduler).__name__
            has_ratio = hasattr(scheduler, 'eta_min_ratio')
            instead = (f'eta_min_ratio={eta_min / base:.4g} (the same end rate for the base '
                       'groups) or eta_min=0' if has_ratio else 'eta_min=0')
            problems.append(
                f'param_scheduler[{index}] ({name}, eta_min={eta_min:g}) drives every param '
                f'group to the same absolute learning rate, so the {len(multipliers)} factor '
                'groups of the expanded layers, whose rates ExpandNetOptimWrapperConstructor '
                f'scaled by {min(multipliers):.3g}..{max(multipliers):.3g}, lose that '
                f'scaling towards its end (up to {1 / min(multipliers):.3g}x their intended '
                f'rate). Use {instead}.')
    return problems
