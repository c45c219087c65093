"""``ExpandNetCheckHook``: every start-of-training check, under any entry point."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop, find_latest_checkpoint

from ..checkpoint import read_checkpoint
from ..checks import (check_constructor_for_paramwise_keys, check_load_from_fits,
                      check_plain_load_from, check_training_data, ddp_wrapper_warning,
                      available_memory_bytes, dropped_base_hooks_warning,
                      missing_setup_warnings, save_memory_note, schedule_warnings)
from ..models.deployable import find_deployable, unwrap_model
from .safe_checkpoint import SafeCheckpointHook, unreadable_reason
from ..surgery import expanded_layers


def _is_training(runner) -> bool:
    """Whether ``runner.train()`` is running (it builds the train loop before ``before_run``)."""
    return isinstance(getattr(runner, '_train_loop', None), BaseLoop)


def _safe_checkpoint_falls_back(runner, path: str) -> bool:
    """Whether ``SafeCheckpointHook`` will pass over the unreadable auto-resume file ``path``.

    It acts in its own ``before_run``, after this hook's (``CheckpointHook``'s
    priority is ``VERY_LOW``), so the file named in ``last_checkpoint`` is not
    yet the one that will be resumed from.
    """
    return ('://' not in path and any(isinstance(h, SafeCheckpointHook) for h in runner.hooks)
            and unreadable_reason(path) is not None)


def check_load_from(runner) -> None:
    """Refuse the checkpoint a training run will load if a plain model would half-load it.

    The file is ``load_from``, or for ``resume=True`` alone the work dir's
    latest checkpoint, as mmengine finds it (see
    :func:`~expand_mm.checks.check_plain_load_from`).
    """
    path = runner._load_from
    if path is None and runner._resume:
        path = find_latest_checkpoint(runner.work_dir)
        if isinstance(path, str) and _safe_checkpoint_falls_back(runner, path):
            return  # SafeCheckpointHook resumes from the newest readable one instead
    if isinstance(path, str) and '://' not in path:
        check_plain_load_from(unwrap_model(runner.model), path, bool(runner._resume))


@HOOKS.register_module()
class ExpandNetCheckHook(Hook):
    """Run expand_mm's start-of-training checks (:mod:`expand_mm.checks`) from the config.

    A config carries it (``default_hooks = dict(...,
    expand_check=dict(type='ExpandNetCheckHook'))``), so the checks fire
    whatever starts the run: mmdet's or mmseg's ``tools/train.py``,
    ``Runner.from_cfg(cfg).train()``, or this repository's ``tools/train.py``
    (which adds the hook to configs that lack it).

    - ``before_run`` (priority ``VERY_HIGH``: before any hook builds on the
      model, and before the runner loads a checkpoint): a missing or corrupt
      ``load_from`` is refused; in a training run, a checkpoint that a plain
      model would half-load is refused, and ``paramwise_cfg`` keys given to a
      constructor that ignores them.
    - ``before_train``: warnings for what the config leaves out (the per-factor
      constructor under an adaptive optimizer, ``ContractCheckpointHook``, and,
      for an ExpandNet or training-time wrapper, custom hooks of its
      ``_base_`` config that its own ``custom_hooks`` list replaced), for
      schedulers whose absolute floor undoes the per-factor rates, and for a
      stock DDP wrapper that keeps an ExpandNet from deferring its factor
      gradients; and, when it is large, what each save's compact twin will
      need in memory (:func:`~expand_mm.checks.save_memory_note`).
    """

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        """Refuse a checkpoint or optimizer setting that would spoil the run, before loading."""
        load_from = runner._load_from
        if isinstance(load_from, str) and '://' not in load_from:
            read_checkpoint(load_from, mmap=True)  # names a missing / corrupt file
        if not _is_training(runner):
            return
        check_load_from(runner)
        check_constructor_for_paramwise_keys(runner.cfg.get('optim_wrapper'))
        check_load_from_fits(unwrap_model(runner.model), runner._load_from)
        check_training_data(runner.model, runner.train_dataloader.dataset)

    def before_train(self, runner) -> None:
        """Log what the setup leaves out or undoes."""
        warnings = missing_setup_warnings(runner.cfg, runner.model, runner.hooks)
        warnings += schedule_warnings(unwrap_model(runner.model), runner.optim_wrapper,
                                      runner.param_schedulers)
        ddp = ddp_wrapper_warning(runner.model)
        warnings += [ddp] if ddp else []
        deployable, prefix = find_deployable(runner.model)
        if prefix or expanded_layers(deployable):
            dropped = dropped_base_hooks_warning(runner.cfg, runner.hooks)
            warnings += [dropped] if dropped else []
        for warning in warnings:
            runner.logger.warning(f'ExpandNetCheckHook: {warning}')
        note = save_memory_note(runner.model, available_memory_bytes())
        if note:
            level, message = note
            getattr(runner.logger, level)(f'ExpandNetCheckHook: {message}')
