"""``ExpandCheckpointLoadHook``: load compact checkpoints into an ExpandNet, refuse misfits."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import find_latest_checkpoint

from ..checkpoint import (CheckpointError, compact_key_shapes, expanded_key_shapes,
                          match_state_dict, refuse_mostly_misfitting, strip_prefix)
from ..compat import guard_checkpoint_loaders
from ..models.deployable import find_deployable, unwrap_model
from ..surgery import expanded_layers
from ..verification import listed, non_finite_entries


def _article(word: str) -> str:
    return 'an' if word[:1] in 'aeiou' else 'a'


def _refuse_non_finite_weights(checkpoint: dict, source: str) -> None:
    """Refuse a checkpoint whose weights hold a NaN or an Inf, naming the keys.

    Such weights compute nothing usable, and training from them cannot recover.
    """
    bad = non_finite_entries(checkpoint.get('state_dict', checkpoint))  # or a bare state dict
    if bad:
        raise CheckpointError(
            f'{source} holds NaN or Inf in {len(bad)} weight{"s" * (len(bad) != 1)}: '
            f'{listed(bad)}. It was saved after training diverged; use an earlier '
            'checkpoint of the run (and a lower learning rate or optim_wrapper.clip_grad '
            'to go on from it)')


@HOOKS.register_module()
class ExpandCheckpointLoadHook(Hook):
    """Let an ExpandNet load compact checkpoints and refuse ones that do not fit.

    Acts in ``after_load_checkpoint`` -- after the runner has read a
    ``load_from`` / ``resume`` file and before it copies the weights into the
    model -- with priority ``VERY_HIGH`` so it runs before ``EMAHook`` copies the
    weights into its averaged model. A compact checkpoint (stock keys, e.g. a
    pretrained compact model or a ``*_compact.pth``) is converted to exact
    factors (by the expanded layers as they load it) so the ExpandNet computes
    what it did; an expanded training checkpoint loads as is; anything else
    raises, naming the keys that do not fit, before anything is loaded.

    A training-time wrapper (``deployable_model()`` protocol) accepts its own
    training checkpoints and checkpoints of its deployable network alone
    (e.g. a compact model to start a distilled student from), which load into
    the deployable part; resuming from the latter is refused.

    Args:
        strict: If False, accept partial checkpoints (e.g. fine-tuning a model
            with another head): what fits is converted, the rest is left to the
            runner's missing-key warnings. A checkpoint that would set fewer
            than half of the entries because shared ones have other shapes (the
            model at another width) is refused all the same.
    """

    priority = 'VERY_HIGH'

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict

    def before_run(self, runner) -> None:
        """Guard the checkpoint loaders; let a resumed distiller take the resumed teacher.

        Every loader of mmengine's ``CheckpointLoader`` loads weights only
        (:func:`~expand_mm.compat.guard_checkpoint_loaders`; done at import,
        repeated here for a scheme registered since), before the runner loads
        ``load_from`` / ``resume`` and initialises ``Pretrained`` weights.

        A resumed distiller checkpoint holds the teacher, so its own
        ``teacher_ckpt`` file need not exist any more
        (``Distiller.expect_teacher_from_resume``); only when there is
        something to resume (auto-resume may find nothing).
        """
        guard_checkpoint_loaders()
        if runner._resume and (runner._load_from or find_latest_checkpoint(runner.work_dir)):
            expect = getattr(unwrap_model(runner.model), 'expect_teacher_from_resume', None)
            if callable(expect):
                expect()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Convert or check ``checkpoint['state_dict']`` in place.

        With a training-time wrapper, a checkpoint with the wrapper's keys (its
        own training checkpoint) has its deployable part checked; a checkpoint
        of the deployable network alone (a compact or ``*_compact.pth``
        checkpoint, or an ExpandNet's) is re-keyed under the deployable
        network's prefix and completed with the wrapper's current other entries
        (teacher, adapters, auxiliary branch), so ``load_from=`` starts the
        deployable part from it and leaves the rest as initialised.
        """
        resumed = runner._load_from or find_latest_checkpoint(runner.work_dir)
        source = (str(runner._load_from or 'the loaded checkpoint') if not runner._resume
                  else f'resumed checkpoint {resumed!r}' if resumed
                  else 'resumed checkpoint (the latest in the work dir)')
        _refuse_non_finite_weights(checkpoint, source)
        deployable, prefix = find_deployable(runner.model)
        if not prefix and not expanded_layers(deployable):
            return
        state_dict = strip_prefix(checkpoint['state_dict'])
        own = bool(prefix) and any(k.startswith(prefix) for k in state_dict)
        part = ({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                if own else state_dict)
        try:
            kind = match_state_dict(deployable, part, strict=self.strict, source=source)
        except CheckpointError as err:
            if runner._resume:
                raise
            raise CheckpointError(
                f"{err} To fine-tune from it with another head (or from a partial checkpoint), "
                'load it non-strictly: --cfg-options default_hooks.expand_load.strict=False '
                "(the config's dict(type='ExpandCheckpointLoadHook', strict=False))") from None
        if not self.strict:  # a partial checkpoint, but not one of another width
            refuse_mostly_misfitting(expanded_key_shapes(deployable) if kind == 'expanded'
                                     else compact_key_shapes(deployable), part, source,
                                     type(deployable).__name__)
        if not expanded_layers(deployable):
            kind = 'compact'
        if prefix and not own:
            if runner._resume:
                raise CheckpointError(
                    f'{source} holds only the deployable network ({type(deployable).__name__}'
                    f'), not the {type(unwrap_model(runner.model)).__name__} that is trained: '
                    'there is nothing to resume. Use it with load_from=... (resume=False) '
                    'to start the deployable part from it, or resume from the training '
                    'checkpoint (iter_N.pth / epoch_N.pth)')
            # The wrapper's other entries keep their current (initialised) values, so
            # the load stays strict and only the deployable part changes.
            wrapper_state = unwrap_model(runner.model).state_dict()
            checkpoint['state_dict'] = {
                **{k: v for k, v in wrapper_state.items() if not k.startswith(prefix)},
                **{prefix + k: v for k, v in part.items()}}
            runner.logger.info(
                f'ExpandCheckpointLoadHook: {source} is {_article(kind)} {kind} checkpoint of '
                f'the deployable network: loaded under {prefix!r}; the other entries of '
                f'{type(unwrap_model(runner.model)).__name__} keep their initialised values'
                + (' (factorised exactly into the expanded layers)' if kind == 'compact'
                   and expanded_layers(deployable) else ''))
            return
        if kind == 'compact' and runner._resume and expanded_layers(deployable):
            raise CheckpointError(
                f'{source} holds the compact model (no expansion factors), whose optimizer '
                'state, if any, does not fit this ExpandNet: there is nothing to resume. Use '
                'it with load_from=... to start an ExpandNet from it, or resume from a '
                'training checkpoint of this config (epoch_N.pth / iter_N.pth)')
        what = (f'a checkpoint of the {type(unwrap_model(runner.model)).__name__} that is '
                f'trained, its deployable part {_article(kind)} {kind} one' if own
                else f'{_article(kind)} {kind} checkpoint')
        runner.logger.info(f'ExpandCheckpointLoadHook: {source} is {what}'
                           + (' (factorised exactly into the expanded layers)'
                              if kind == 'compact' and expanded_layers(deployable) else ''))
