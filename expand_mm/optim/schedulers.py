"""``PolyLRRatio``: MMEngine's ``PolyLR`` whose floor is a fraction of each group's rate.

Why: ``PolyLR(eta_min=...)`` (the stock mmseg schedule) ends every param group
at the same absolute rate, undoing the per-factor learning rates of an
ExpandNet (see :mod:`~expand_mm.optim.schedule_check`). MMEngine's cosine
schedulers take ``eta_min_ratio`` for this; its ``PolyLR`` does not.
"""
from __future__ import annotations

from typing import Any

from mmengine.optim.scheduler import PolyLR
from mmengine.registry import PARAM_SCHEDULERS

from ..errors import ConfigError


@PARAM_SCHEDULERS.register_module()
class PolyLRRatio(PolyLR):
    """``PolyLR`` ending each param group at ``eta_min_ratio`` times its initial rate.

    Same polynomial decay as ``PolyLR`` (``power``, ``begin``, ``end``,
    ``by_epoch``, ``convert_to_iter_based``); with ``eta_min_ratio=None`` it
    is ``PolyLR`` with its absolute ``eta_min``. Use it in place of the stock
    ``dict(type='PolyLR', eta_min=1e-4, ...)`` as
    ``dict(type='PolyLRRatio', eta_min_ratio=1e-4 / base_lr, ...)``: the
    compact groups end where they did, the factor groups at the same fraction
    of their own rate.

    Args:
        optimizer: The optimizer or optim wrapper.
        eta_min_ratio: Each group's final rate over its initial rate, in [0, 1).
        **kwargs: ``PolyLR``'s arguments (``eta_min`` only without a ratio).

    Raises:
        ValueError: For a ratio outside [0, 1), or both ``eta_min`` and a ratio.
    """

    def __init__(self, optimizer: Any, eta_min_ratio: float | None = None, **kwargs: Any):
        if eta_min_ratio is not None:
            if not isinstance(eta_min_ratio, (int, float)) or not 0 <= eta_min_ratio < 1:
                raise ConfigError(f'PolyLRRatio: eta_min_ratio={eta_min_ratio!r} must be a '
                                  'number in [0, 1)')
            if kwargs.get('eta_min'):
                raise ConfigError('PolyLRRatio: give eta_min_ratio or eta_min, not both')
        self.eta_min_ratio = eta_min_ratio
        super().__init__(optimizer, **kwargs)

    def _get_value(self) -> list[float]:
        """The chainable polynomial step, towards each group's own floor."""
        if self.eta_min_ratio is None:
            return super()._get_value()
        groups = self.optimizer.param_groups
        if self.last_step == 0:
            return [group[self.param_name] for group in groups]
        decay = (1 - 1 / (self.total_iters - self.last_step + 1)) ** self.power
        values = []
        for group in groups:
            floor = self.eta_min_ratio * group[f'initial_{self.param_name}']
            values.append((group[self.param_name] - floor) * decay + floor)
        return values
