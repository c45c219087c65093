"""Scale the factor learning rates per layer once the starting weights exist."""
from __future__ import annotations

from typing import Any

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from ..layers import ExpandedLayer
from ..models.deployable import unwrap_model
from ..optim.factor_lr import CALIBRATION_KEY, CALIBRATION_PENDING
from ..optim.lr_calibration import calibrated_scale
from ..optim.product_decay import FACTOR_LR_MULT_KEY
from ..optim.schedule_check import flat_schedulers, optimizers_of
from ..surgery import expanded_layers


def _factor_owners(model: nn.Module) -> dict[int, tuple[str, ExpandedLayer]]:
    """Parameter id -> (path, expanded layer) for every factor parameter of ``model``."""
    return {id(param): (path, layer) for path, layer in expanded_layers(model)
            for param in layer.sublayers.parameters()}


def _scale_group(group: dict, scale: float) -> None:
    """Multiply a param group's rate, the rate schedules start from, and its record."""
    group['lr'] *= scale
    if 'initial_lr' in group:
        group['initial_lr'] *= scale
    if FACTOR_LR_MULT_KEY in group:
        group[FACTOR_LR_MULT_KEY] *= scale
    group[CALIBRATION_KEY] = scale


def _scale_schedulers(schedulers: list, optimizer: Any, index: int, scale: float) -> None:
    """Scale what each scheduler of ``optimizer`` remembers of group ``index``'s rate.

    MMEngine's schedulers keep the group's starting rate (``base_values``,
    read e.g. by ``eta_min_ratio``) and the last rate they set.
    """
    for scheduler in schedulers:
        target = getattr(scheduler, 'optimizer', None)  # a torch optimizer or an OptimWrapper
        if target is not optimizer and getattr(target, 'optimizer', None) is not optimizer:
            continue
        if getattr(scheduler, 'param_name', 'lr') != 'lr':
            continue
        for name in ('base_values', '_last_value'):
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and index < len(values):
                values[index] *= scale


@HOOKS.register_module()
class FactorLRCalibrationHook(Hook):
    """Apply ``factor_lr='calibrated'``: scale each expanded layer's factor rates.

    Acts in ``before_train`` (priority ``VERY_HIGH``, before any hook reads
    the rates), after ``init_weights`` and ``load_from`` have set the values
    training starts from and before the first step. For every factor param
    group that :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor`
    marked pending, it measures the layer's scale
    (:func:`~expand_mm.optim.lr_calibration.calibrated_scale`), multiplies
    the group's rate, its ``initial_lr`` and the schedulers' memory of it, and
    records the scale in the group. A resumed run loads groups already scaled
    and is left alone. Does nothing for any other ``factor_lr``.

    Config::

        custom_hooks = [dict(type='FactorLRCalibrationHook')]
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        """Scale every pending factor group of every optimizer."""
        owners = None
        scales: dict[str, float] = {}
        schedulers = flat_schedulers(runner.param_schedulers)
        for optimizer in optimizers_of(runner.optim_wrapper):
            for index, group in enumerate(optimizer.param_groups):
                if group.get(CALIBRATION_KEY) != CALIBRATION_PENDING:
                    continue
                if owners is None:
                    owners = _factor_owners(unwrap_model(runner.model))
                path, layer = owners[id(group['params'][0])]
                if path not in scales:
                    scales[path] = calibrated_scale(layer)
                _scale_group(group, scales[path])
                _scale_schedulers(schedulers, optimizer, index, scales[path])
        if scales:
            self._log(runner, scales)

    @staticmethod
    def _log(runner, scales: dict[str, float]) -> None:
        """One line of the scales' range; the per-layer scales at debug level."""
        values = sorted(scales.values())
        runner.logger.info(
            f'FactorLRCalibrationHook: factor rates of {len(scales)} expanded layers '
            f'calibrated (scale {values[0]:.3g}..{values[-1]:.3g}, median '
            f'{values[len(values) // 2]:.3g})')
        for path, scale in scales.items():
            runner.logger.debug(f'FactorLRCalibrationHook: {path} x{scale:.4g}')
