"""Stretching or shrinking a config's training schedule as one piece.

A study of schedule length (1x, 2x, 4x) must change every number that is
counted in the training loop's unit together: the loop's length, the
validation and checkpoint intervals, and each parameter scheduler's
``begin`` / ``end`` / ``T_max`` / ``milestones``. Changing ``max_iters`` alone
would run the learning-rate schedule's tail at its final rate.
"""
from __future__ import annotations

from typing import Any

from mmengine.config import Config

from .errors import ConfigError

# Scheduler arguments that count steps of the training loop's unit.
SCHEDULER_STEP_KEYS = ('begin', 'end', 'T_max', 'total_iters', 'warmup_iters')


def _loop_length_key(cfg: Config) -> str:
    """``'max_iters'`` or ``'max_epochs'``: the unit the config's training loop counts in."""
    train_cfg = cfg.get('train_cfg') or {}
    for key in ('max_iters', 'max_epochs'):
        if isinstance(train_cfg.get(key), int):
            return key
    raise ConfigError('scale_schedule: train_cfg has neither max_iters nor max_epochs; '
                      'only IterBasedTrainLoop / EpochBasedTrainLoop schedules can be scaled')


def _scaled(value: int, factor: float) -> int:
    """``value * factor`` rounded, at least 1 for a positive ``value`` (0 stays 0)."""
    return max(1, int(round(value * factor))) if value else 0


def _scale_scheduler(scheduler: dict, factor: float, old_length: int) -> None:
    """Scale one parameter scheduler's step counts in place.

    ``end`` may be mmengine's "to the end" sentinel (a huge number); an ``end``
    at or past the old loop length is moved to the new length.
    """
    for key in SCHEDULER_STEP_KEYS:
        value = scheduler.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            scheduler[key] = (_scaled(old_length, factor) if key == 'end' and value >= old_length
                              else _scaled(value, factor))
    if isinstance(scheduler.get('milestones'), (list, tuple)):
        scheduler['milestones'] = [_scaled(m, factor) for m in scheduler['milestones']]


def _schedulers(param_scheduler: Any) -> list[dict]:
    """The scheduler dicts of ``param_scheduler`` (a dict, a list, or a dict of lists)."""
    if param_scheduler is None:
        return []
    if isinstance(param_scheduler, dict) and 'type' not in param_scheduler:
        return [s for value in param_scheduler.values() for s in _schedulers(value)]
    return list(param_scheduler) if isinstance(param_scheduler, (list, tuple)) \
        else [param_scheduler]


def scale_schedule(cfg: Config, factor: float) -> int:
    """Scale the training schedule of ``cfg`` by ``factor`` in place.

    Scales the loop length (``train_cfg.max_iters`` or ``max_epochs``), the
    validation interval, the checkpoint hook's interval and the step counts of
    every parameter scheduler (see :data:`SCHEDULER_STEP_KEYS` and
    ``milestones``), all rounded to whole steps.

    Args:
        cfg: A loaded config (its ``param_scheduler`` in the loop's unit).
        factor: Positive length factor (2 doubles the schedule).

    Returns:
        The new loop length.

    Raises:
        ConfigError: For a non-positive factor or a loop of another kind.
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f'scale_schedule: factor={factor!r} must be a positive number')
    key = _loop_length_key(cfg)
    old_length = cfg.train_cfg[key]
    for scheduler in _schedulers(cfg.get('param_scheduler')):
        _scale_scheduler(scheduler, factor, old_length)
    cfg.train_cfg[key] = _scaled(old_length, factor)
    if isinstance(cfg.train_cfg.get('val_interval'), int):
        cfg.train_cfg.val_interval = _scaled(cfg.train_cfg.val_interval, factor)
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if checkpoint and isinstance(checkpoint.get('interval'), int) and checkpoint.interval > 0:
        checkpoint.interval = _scaled(checkpoint.interval, factor)
    return cfg.train_cfg[key]
