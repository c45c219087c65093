"""``ChannelPlantingHook``: channel planting inside MMEngine's training loop."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import HOOKS

from ..compat import plain_builtins
from ..models.deployable import deployable_model
from ..planting import FREEZE_MODES, ChannelPlanter, PlantingError, stage_label


def model_probe(model: Any, data_batch: Any) -> Callable[[], Any]:
    """A callable running ``model`` on ``data_batch``: raw outputs, no loss, no grad.

    MMEngine models go through their data preprocessor (``training=False``)
    and ``mode='tensor'``; other modules are called on the batch as it is.
    """
    if isinstance(model, BaseModel):
        data = model.data_preprocessor(data_batch, False)
        return lambda: model(data['inputs'], data.get('data_samples'), mode='tensor')
    return lambda: model(data_batch)


def restore_frozen_after_steps(runner, planter: ChannelPlanter, owner: str) -> None:
    """Make the runner's optimizer put the planter's frozen entries back after every step.

    Weight decay and momentum move entries whose gradient is zero.

    Raises:
        PlantingError: Unless the runner has a single optim wrapper.
    """
    optimizer = getattr(runner.optim_wrapper, 'optimizer', None)
    if optimizer is None:
        raise PlantingError(f'{owner}: needs a single optim wrapper '
                            f'(got {type(runner.optim_wrapper).__name__})')
    optimizer.register_step_post_hook(lambda *_: planter.restore_frozen())


@HOOKS.register_module()
class ChannelPlantingHook(Hook):
    """Grow the deployable model's channels in stages, old weights frozen.

    Channel planting (Mitsuno et al., ICPR 2020) on the stock compact model of
    the config (see :mod:`expand_mm.planting` for how): training starts with a
    fraction ``stages[0]`` of every selected unit's output channels, and at each
    milestone the next fraction is planted, the network's function kept (the
    new channels' readers start at zero, checked on the batch of that
    iteration) and, with ``freeze='all'``, every older parameter entry frozen.
    Train it with distillation from a larger teacher by wrapping the model in
    ``type='Distiller'``: the hook acts on the wrapper's deployable model.

    Acts at:

    - ``before_train``: checks the settings against the model and registers an
      optimizer step post-hook that restores frozen and not yet planted entries
      after every step (weight decay and momentum would otherwise move them,
      from the first stage on);
    - the first ``before_train_iter``: applies the stage of the current
      iteration / epoch (the first at the start; the right one after a
      resume), tracing on that batch which convs read the stage's new and not
      yet planted channels;
    - ``after_train_iter`` / ``after_train_epoch``: plants the next stage when
      the next iteration / epoch is a milestone;
    - ``before_save_checkpoint``: records the stage, widths and masked
      entries in ``meta`` (``stage`` there is the 0-based index; messages
      number stages from 1: :func:`~expand_mm.planting.stage_label`).

    The checkpoint always has the stock architecture and keys. After the last
    milestone every channel is planted and the model is exactly the stock one
    (no mask left), so the final checkpoint is the deployable compact model.
    One saved earlier holds channels that are still masked (their weights are
    kept: they start training when planted); its compact copy
    (``ContractCheckpointHook``, ``tools/contract.py``) has them zeroed, the
    narrower network of its stage (:func:`~expand_mm.planting.bake_planting_masks`).
    An ``EMAHook``
    validates by copying its averaged weights into this model, so the masks
    apply there too; its averaged weights of a stage's new channels and of
    their readers were averaged while masked, so right after a planting step
    EMA validation lags the live model until the average catches up.

    Args:
        include: Glob patterns of module paths; the mmcv ``ConvModule`` units
            under them are planted, e.g. ``['backbone.*']``.
        stages: Planted fraction of each unit's channels per stage, strictly
            increasing, ending with 1.0.
        milestones: Iterations (or epochs with ``by_epoch=True``) at which
            stages 1, 2, ... begin; one fewer than ``stages``.
        exclude: Glob patterns of units to keep at full width.
        freeze: ``'all'`` (the paper) or ``'none'``.
        by_epoch: Whether ``milestones`` count epochs.
        verify_rtol: Largest accepted relative change of the model's outputs
            at a planting step.
    """

    priority = 'NORMAL'

    def __init__(self, include: Sequence[str], stages: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                 milestones: Sequence[int] = (), exclude: Sequence[str] | None = None,
                 freeze: str = 'all', by_epoch: bool = False, verify_rtol: float = 1e-5) -> None:
        stages = [float(s) for s in stages]
        milestones = list(milestones)
        if len(milestones) != len(stages) - 1:
            raise PlantingError(
                f'ChannelPlantingHook: milestones={milestones!r} must give the start of each '
                f'stage after the first: {len(stages) - 1} for stages={stages!r}')
        if (not all(isinstance(m, int) and not isinstance(m, bool) and m > 0
                    for m in milestones) or milestones != sorted(set(milestones))):
            raise PlantingError(f'ChannelPlantingHook: milestones={milestones!r} must be '
                                'strictly increasing positive ints')
        if freeze not in FREEZE_MODES:
            raise PlantingError(f'ChannelPlantingHook: freeze={freeze!r} must be one of '
                                f'{FREEZE_MODES}')
        self.include = list(include) if not isinstance(include, str) else include
        self.stages = stages
        self.milestones = milestones
        self.exclude = list(exclude or [])
        self.freeze = freeze
        self.by_epoch = by_epoch
        self.verify_rtol = verify_rtol
        self.planter: ChannelPlanter | None = None
        self._started = False
        self._last_batch: Any = None

    def _stage_at(self, position: int) -> int:
        return sum(1 for m in self.milestones if m <= position)

    def before_train(self, runner) -> None:
        """Select the units and hook the optimizer's step."""
        model = deployable_model(runner.model)
        self.planter = ChannelPlanter(model, self.include, self.stages, self.exclude,
                                      self.freeze, self.verify_rtol)
        position = runner.epoch if self.by_epoch else runner.iter
        last = self.milestones[-1] if self.milestones else 0
        max_position = runner.max_epochs if self.by_epoch else runner.max_iters
        if max_position is not None and last >= max_position:
            raise PlantingError(
                f'ChannelPlantingHook: the last milestone ({last}) is not before the end of '
                f'training ({max_position} {"epochs" if self.by_epoch else "iterations"}): the '
                'model would never reach its full, stock width')
        restore_frozen_after_steps(runner, self.planter, type(self).__name__)
        planter = self.planter
        self._started = False
        unit = 'epochs' if self.by_epoch else 'iterations'
        runner.logger.info(
            f'ChannelPlantingHook: {len(planter.units)} units, stages {self.stages} starting at '
            f'{unit} {[0] + self.milestones}; this run starts at '
            f'{stage_label(self._stage_at(position), self.stages)}')

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        """On the first iteration, apply the stage that the run is at."""
        if self._started:
            return
        position = runner.epoch if self.by_epoch else runner.iter
        stage = self._stage_at(position)
        model = deployable_model(runner.model)
        self.planter.start(stage, model_probe(model, data_batch))
        self._started = True
        self._log(runner, stage_label(stage, self.stages))

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """Plant the next stage when the next iteration is a milestone."""
        self._last_batch = data_batch
        if not self.by_epoch and runner.iter + 1 in self.milestones:
            self._advance(runner, data_batch)

    def after_train_epoch(self, runner) -> None:
        """Plant the next stage when the next epoch is a milestone."""
        if self.by_epoch and runner.epoch + 1 in self.milestones:
            self._advance(runner, self._last_batch)

    def _advance(self, runner, data_batch: Any) -> None:
        model = deployable_model(runner.model)
        self.planter.advance(model_probe(model, data_batch))
        self._log(runner, f'planted {stage_label(self.planter.stage, self.stages)}')

    def _log(self, runner, what: str) -> None:
        planter = self.planter
        widths = planter.active_widths()
        planted = sum(a for a, _ in widths.values())
        full = sum(f for _, f in widths.values())
        runner.logger.info(
            f'ChannelPlantingHook: {what}: {planted}/{full} channels of {len(widths)} units '
            f'planted; {planter.num_trainable_entries():,} parameter entries train')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Record the stage and planted widths in the checkpoint's ``meta``."""
        if self.planter is None or self.planter.stage < 0:
            return
        # Plain builtins only: torch >= 2.6 reads checkpoints with weights_only=True.
        checkpoint.setdefault('meta', {})['channel_planting'] = plain_builtins(dict(
            stage=self.planter.stage, stages=self.stages,
            widths={p: a for p, (a, _) in self.planter.active_widths().items()},
            masked_entries=self.planter.masked_entries()))
