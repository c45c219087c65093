"""The L2 term of the weight decay, logged next to the task losses."""
from __future__ import annotations

from typing import Any

from mmengine.hooks import Hook, LoggerHook
from mmengine.optim import OptimWrapperDict
from mmengine.registry import HOOKS

from ..errors import ConfigError
from ..models.deployable import deployable_model
from ..optim.product_decay import weight_decay_term
from ..surgery import expanded_layers

SCALAR_NAME = 'loss_l2'


@HOOKS.register_module()
class WeightDecayTermHook(Hook):
    """Write the weight decay's L2 term as the scalar ``loss_l2`` every ``interval`` iterations.

    The task losses a model returns leave out the weight decay, which the
    optimizer applies itself; the total objective is their sum plus
    ``loss_l2`` (:func:`~expand_mm.optim.product_decay.weight_decay_term`:
    ``lambda / 2 * ||w||^2`` over what the optimizer decays, the composed
    kernels under ``weight_decay_on='product'``, every factor otherwise). The
    ExpandNets paper compares the two settings on that total.

    A hook, not part of the optimizer: the optimizer's step is left exactly as
    it is (the term is read under ``no_grad`` after the step, nothing is
    written back), and a hook reaches the visualiser. It acts at
    ``after_train_iter``, every ``interval`` iterations -- by default the
    ``LoggerHook``'s, so the value is written with the same step as the
    logged losses -- through ``runner.visualizer.add_scalars`` (every
    backend: ``vis_data/scalars.json``, TensorBoard, ...), not through the
    message hub, whose log processor would average a ``loss*`` key over a
    window of iterations it was not written at.

    Args:
        interval: Iterations between two values; ``None``: the
            ``LoggerHook``'s interval (50 without one).
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int | None = None):
        if interval is not None and (isinstance(interval, bool)
                                     or not isinstance(interval, int) or interval < 1):
            raise ConfigError(f'WeightDecayTermHook: interval={interval!r} must be an int >= 1 '
                              "or None (the LoggerHook's)")
        self.interval = interval

    def before_train(self, runner) -> None:
        """Take the ``LoggerHook``'s interval unless one was given."""
        if self.interval is None:
            loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
            self.interval = loggers[0].interval if loggers else 50

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """Write ``loss_l2`` every ``interval`` iterations."""
        if self.every_n_train_iters(runner, self.interval):
            runner.visualizer.add_scalars({SCALAR_NAME: self.term(runner)},
                                          step=runner.iter + 1)

    @staticmethod
    def term(runner) -> float:
        """The L2 term of every optimizer of ``runner`` at the current parameters."""
        wrapper = runner.optim_wrapper
        wrappers = wrapper.values() if isinstance(wrapper, OptimWrapperDict) else [wrapper]
        layers = expanded_layers(deployable_model(runner.model))
        return sum(weight_decay_term(w.optimizer, layers) for w in wrappers)
