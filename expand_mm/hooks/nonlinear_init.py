"""Initialise an ExpandNet from its nonlinear counterpart (ExpandNets, Sec. 3.2)."""
from __future__ import annotations

import copy

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop
from torch import nn

from ..checkpoint import NONLINEAR_INIT_META_KEY
from ..compat import plain_builtins
from ..errors import ConfigError
from ..layers import ExpandedLayer
from ..models.deployable import deployable_model
from ..surgery import expanded_layers


def _build_activation(act_cfg: dict) -> nn.Module:
    """A fresh activation module from ``act_cfg``; raises naming the hook's key."""
    from mmcv.cnn import build_activation_layer
    if not isinstance(act_cfg, dict) or 'type' not in act_cfg:
        raise ConfigError(f'NonlinearInitHook: act_cfg={act_cfg!r} must be a dict with a '
                          "'type', e.g. dict(type='ReLU')")
    try:
        act = build_activation_layer(copy.deepcopy(act_cfg))
    except KeyError as err:
        raise ConfigError(f'NonlinearInitHook: act_cfg type {act_cfg["type"]!r} is not a '
                          "registered activation (mmcv's MODELS): use e.g. 'ReLU', "
                          f"'LeakyReLU', 'GELU', 'SiLU', 'ELU': {err}") from err
    if not isinstance(act, nn.Module):
        raise ConfigError(f'NonlinearInitHook: act_cfg={act_cfg!r} built a '
                          f'{type(act).__name__}, not an nn.Module')
    if any(True for _ in act.parameters()):
        # The optimizer exists before the hook acts, so such parameters would
        # never train, and they would add keys to the training checkpoints.
        raise ConfigError(f'NonlinearInitHook: act_cfg={act_cfg!r} has parameters; use a '
                          "parameter-free activation such as 'ReLU' or 'LeakyReLU'")
    return act


@HOOKS.register_module()
class NonlinearInitHook(Hook):
    """Train the expanded layers with a nonlinearity inside first, then linear.

    The paper's initialisation from the nonlinear counterpart: the factors of
    every expanded layer are first trained with an activation between the
    sub-layers -- a deeper, nonlinear network with the same parameters --
    then the activation is removed and training continues as the linear
    ExpandNet, which contracts to the compact model. Done in one run here
    rather than as two trainings, so the optimizer state and schedule go on.

    Acts at two runner stages:

    - ``before_train`` (after ``load_from`` / resume, so the resumed iteration
      or epoch is known): if training is before ``end``, every expanded layer
      of the deployable model (:func:`~expand_mm.models.deployable_model`) is
      put into explicit mode -- the chain runs on activations, which is the
      only place a nonlinearity can go -- with its own fresh activation. Each
      layer's mode is remembered. Resuming at or past ``end`` leaves the model
      linear.
    - ``after_train_iter`` (``by_epoch=False``) / ``after_train_epoch``
      (``by_epoch=True``): once ``end`` iterations / epochs are done, the
      activations are removed and the modes restored. Priority ``NORMAL``
      runs this before ``CheckpointHook`` (``VERY_LOW``), so a checkpoint
      saved at ``end`` is already linear and is contracted as usual.

    While the nonlinearity is set, ``before_save_checkpoint`` marks the
    checkpoint's ``meta`` with :data:`NONLINEAR_INIT_META_KEY`;
    :class:`~expand_mm.hooks.ContractCheckpointHook` skips such checkpoints
    (they have no compact equivalent) with a warning. Validation in that
    phase evaluates the nonlinear network. ``EMAHook`` averages parameters
    only, so it works across the switch (its average mixes both phases'
    weights for a while). Explicit mode costs about ``r^2`` times the compact
    compute per step while the nonlinearity is on.

    Args:
        act_cfg: Activation config (mmcv / MMEngine ``MODELS``), parameter-free;
            default ``dict(type='ReLU')`` as in the paper.
        end: Iteration (``by_epoch=False``) or epoch (``by_epoch=True``) count
            after which the nonlinearity is removed; ``> 0``.
        by_epoch: Count ``end`` in epochs instead of iterations.

    Raises:
        ValueError: On ``end <= 0``, an unknown or parameterised activation,
            or (``before_train``) a model without expanded layers, an ``end``
            at or past the end of training, or ``by_epoch=True`` in an
            iteration-based loop.
    """

    priority = 'NORMAL'

    def __init__(self, act_cfg: dict | None = None, end: int | None = None,
                 by_epoch: bool = False) -> None:
        if isinstance(end, bool) or not isinstance(end, int) or end <= 0:
            raise ConfigError(f'NonlinearInitHook: end={end!r} must be a positive int (the '
                              f'{"epoch" if by_epoch else "iteration"} after which the '
                              'expanded layers become linear)')
        # Plain builtins: act_cfg goes into the checkpoints' meta (see plain_builtins).
        self.act_cfg = dict(type='ReLU') if act_cfg is None else plain_builtins(act_cfg)
        _build_activation(self.act_cfg)  # fail at build time, not at before_train
        self.end = end
        self.by_epoch = by_epoch
        self._modes: dict[str, str] = {}  # path -> mode before the nonlinear phase

    @property
    def active(self) -> bool:
        """Whether the nonlinearity is currently set."""
        return bool(self._modes)

    def _layers(self, runner) -> list[tuple[str, ExpandedLayer]]:
        layers = expanded_layers(deployable_model(runner.model))
        if not layers:
            raise ConfigError('NonlinearInitHook: the model has no expanded layer; use '
                              "model=dict(type='ExpandNet', model=..., ...) in the config")
        return layers

    def _progress(self, runner) -> int:
        return runner.epoch if self.by_epoch else runner.iter

    def before_train(self, runner) -> None:
        """Set the nonlinearity if training (possibly resumed) is before ``end``."""
        layers = self._layers(runner)
        unit = 'epoch' if self.by_epoch else 'iteration'
        done = self._progress(runner)
        if done >= self.end:
            runner.logger.info(f'NonlinearInitHook: training starts at {unit} {done} >= '
                               f'end={self.end}; the expanded layers stay linear')
            return
        if self.by_epoch and isinstance(getattr(runner, 'train_loop', None), IterBasedTrainLoop):
            # after_train_epoch never runs in an iteration-based loop.
            raise ConfigError(
                'NonlinearInitHook: by_epoch=True, but the training loop counts iterations '
                '(IterBasedTrainLoop): the nonlinearity would never be '
                'removed. Give `end` in iterations with by_epoch=False')
        total = runner.max_epochs if self.by_epoch else runner.max_iters
        if total is not None and self.end >= total:
            what = ('the nonlinearity would be removed only after the last '
                    f'{unit}, with no linear training left' if self.end == total else
                    'the model would stay nonlinear to the end, and no checkpoint of it '
                    'would have a compact form')
            raise ConfigError(
                f'NonlinearInitHook: end={self.end} >= the {total} {unit}s of training: '
                f'{what}. Use an end below {total} (the paper removes the nonlinearity '
                'part-way through training)')
        for path, layer in layers:
            self._modes[path] = layer.mode
            layer.set_mode('explicit').set_nonlinearity(_build_activation(self.act_cfg))
        runner.logger.info(
            f'NonlinearInitHook: {len(layers)} expanded layers train in explicit mode with '
            f'{self.act_cfg["type"]} between their sub-layers until {unit} {self.end} '
            f'(now at {done})')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Remove the nonlinearity once ``end`` iterations are done (``by_epoch=False``)."""
        if not self.by_epoch and self.active and runner.iter + 1 >= self.end:
            self._make_linear(runner)

    def after_train_epoch(self, runner) -> None:
        """Remove the nonlinearity once ``end`` epochs are done (``by_epoch=True``)."""
        if self.by_epoch and self.active and runner.epoch + 1 >= self.end:
            self._make_linear(runner)

    def _make_linear(self, runner) -> None:
        for path, layer in expanded_layers(deployable_model(runner.model)):
            mode = self._modes.get(path)
            if mode is None:
                continue
            layer.set_nonlinearity(None).set_mode(mode)
        restored = sorted(set(self._modes.values()))
        self._modes = {}
        unit = 'epoch' if self.by_epoch else 'iteration'
        runner.logger.info(
            f'NonlinearInitHook: {unit} {self.end} reached; removed the nonlinearity, the '
            f'expanded layers are linear again ({"/".join(restored)} mode) and contract '
            'to the compact model')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Mark a checkpoint saved during the nonlinear phase."""
        if self.active:
            checkpoint.setdefault('meta', {})[NONLINEAR_INIT_META_KEY] = dict(
                act_cfg=plain_builtins(self.act_cfg), end=int(self.end),
                by_epoch=bool(self.by_epoch))
