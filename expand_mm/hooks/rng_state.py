"""``RNGStateHook``: a resumed run draws the random numbers the uninterrupted one drew."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from mmengine.dist import get_world_size
from mmengine.model import is_model_wrapper
from torch import nn
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

#: Top-level key of the training checkpoint that holds the generators' states.
RNG_STATE_KEY = 'rng_state'


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (CUDA's when present).

    In types that weights-only loading reads (tuples, ints, floats, tensors).
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                       int(has_gauss), float(cached_gaussian)),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state['numpy']
    # A resume maps the checkpoint's tensors to the training device; the states live on the CPU.
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda.cpu() for cuda in state['cuda']])


def drawn_batch_sizes(model: nn.Module) -> dict[str, tuple | None]:
    """The input sizes that batch augmentations drew for the next batches, by module path.

    A ``BatchSyncRandomResize`` (YOLOX) draws at one iteration the size of the
    batches of the next ones and keeps it in ``_input_size``, which no
    checkpoint holds.
    """
    return {path: module._input_size for path, module in model.named_modules()
            if type(module).__name__ == 'BatchSyncRandomResize'}


def set_drawn_batch_sizes(model: nn.Module, sizes: dict[str, tuple | None]) -> None:
    """Give the batch augmentations of ``model`` the sizes from :func:`drawn_batch_sizes`."""
    modules = dict(model.named_modules())
    for path, size in sizes.items():
        if path in modules:
            modules[path]._input_size = tuple(size) if size is not None else None


class _RestoreBeforeFetch:
    """The train loop's batch iterator, setting the generators before a batch is made.

    The first ``skip`` batches (those a resumed ``IterBasedTrainLoop`` draws
    again to reach its position) are fetched as they come; the next fetch
    first restores the state the hook holds, if any.
    """

    def __init__(self, iterator, hook: 'RNGStateHook', skip: int) -> None:
        self._inner = iterator
        self._hook = hook
        self._skip = skip

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
        else:
            self._hook.apply_pending()
        return next(self._inner)

    def __getattr__(self, name: str) -> Any:  # the wrapped iterator's own attributes
        return getattr(self._inner, name)

    def rewrapped(self, dataloader) -> '_RestoreBeforeFetch':
        """The same wrapper around a fresh batch iterator of ``dataloader``."""
        return _RestoreBeforeFetch(type(self._inner)(dataloader), self._hook, self._skip)


def rebuild_batch_iterator(loop) -> None:
    """Point an ``IterBasedTrainLoop``'s batch iterator at its (rebuilt) ``dataloader``.

    Hooks that rebuild the train dataloader in ``before_train`` (this one, the
    planting search's held-out split) call it, so a wrapper another hook put
    around the iterator (:class:`_RestoreBeforeFetch`) is kept.
    """
    current = getattr(loop, 'dataloader_iterator', None)
    if current is None:  # an epoch-based loop makes its iterator per epoch
        return
    loop.dataloader_iterator = (current.rewrapped(loop.dataloader) if hasattr(current, 'rewrapped')
                                else type(current)(loop.dataloader))


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random generators' states with each checkpoint and restore them on resume.

    MMEngine reseeds the generators when a run resumes and an
    ``IterBasedTrainLoop`` draws its batches again up to the resumed
    iteration; random draws made outside the data pipeline (a model's
    dropout or sampling, a data preprocessor's ``BatchSyncRandomResize``)
    are not replayed, and with ``randomness.seed`` unset the sampler is
    built with a new seed. This hook makes a resumed run continue exactly as
    the uninterrupted one (on one process; bit-identical on a CPU):

    * ``before_save_checkpoint``: stores Python's, NumPy's and torch's states
      (CUDA's when used) in ``checkpoint['rng_state']``, with the input sizes
      that a ``BatchSyncRandomResize`` drew for the next batches;
    * ``after_load_checkpoint`` (resume only): takes the stored states and
      sets the drawn sizes;
    * ``before_train``: a resumed run whose train dataloader was built with
      another seed than the resumed one (``randomness.seed`` unset) gets its
      dataloader rebuilt with the resumed seed (the sampler's order, the
      loader workers' seeds);
    * the states are set just before the first batch after the checkpoint
      is made -- after a resumed loop has skipped to its iteration -- in the
      resumed run and, at the same point, in the uninterrupted one, so random
      numbers drawn between a save and the next batch (validation, other
      hooks) do not tell the two apart.

    Data loader workers are seeded by MMEngine from the seed and the worker
    id, and skipping the trained batches replays their draws, so their
    states need no storing. With several processes the states are not
    restored (each rank has its own; said once).
    """

    priority = 'NORMAL'

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._resumed = False

    def apply_pending(self) -> None:
        """Set the generators to the state taken at the last save or resume, once."""
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the generators' states; set them again before the next batch."""
        self._pending = capture_rng_state()
        checkpoint[RNG_STATE_KEY] = {**self._pending,
                                     'batch_sizes': drawn_batch_sizes(_unwrapped(runner.model))}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Take the stored states when resuming (not for ``load_from`` alone)."""
        if not runner._resume:
            return
        self._resumed = True
        if RNG_STATE_KEY not in checkpoint:
            runner.logger.warning('RNGStateHook: the resumed checkpoint holds no random '
                                  'generator states; the run goes on with reseeded ones')
            return
        if get_world_size() > 1:
            runner.logger.info('RNGStateHook: with several processes the generators are '
                               'reseeded, not restored (the checkpoint holds one rank\'s)')
            return
        self._pending = checkpoint[RNG_STATE_KEY]
        set_drawn_batch_sizes(_unwrapped(runner.model), self._pending.get('batch_sizes', {}))

    def before_train(self, runner) -> None:
        """Rebuild a dataloader seeded otherwise than the resumed run; wrap the batch fetch."""
        loop = runner.train_loop
        if self._resumed and _sampler_seed(loop.dataloader) not in (None, runner.seed):
            self._rebuild_dataloader(runner, loop)
        if hasattr(loop, 'dataloader_iterator'):  # IterBasedTrainLoop: skips, then fetches
            loop.dataloader_iterator = _RestoreBeforeFetch(loop.dataloader_iterator, self,
                                                           skip=loop.iter)

    def _rebuild_dataloader(self, runner, loop) -> None:
        """Build the train dataloader again with the resumed seed (sampler, workers).

        The Runner builds it before it reads the resumed seed; with
        ``randomness.seed`` unset it was built with a new one.
        """
        if not isinstance(runner._train_dataloader, dict):  # given built: nothing to rebuild
            return
        runner.logger.info(f'RNGStateHook: rebuilding the train dataloader with the resumed '
                           f'seed {runner.seed} (set randomness.seed to avoid this)')
        loop.dataloader = runner.build_dataloader(
            runner._train_dataloader, seed=runner.seed,
            diff_rank_seed=runner._randomness_cfg.get('diff_rank_seed', False))
        rebuild_batch_iterator(loop)

    def before_train_epoch(self, runner) -> None:
        """Epoch-based loops make a new batch iterator after this: set the generators."""
        if not hasattr(runner.train_loop, 'dataloader_iterator'):
            self.apply_pending()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP-like wrapper."""
    return model.module if is_model_wrapper(model) else model


def _sampler_seed(dataloader) -> int | None:
    """The seed of the dataloader's sampler (None when it has none)."""
    batch_sampler = getattr(dataloader, 'batch_sampler', None)
    sampler = getattr(batch_sampler, 'sampler', None) or getattr(dataloader, 'sampler', None)
    return getattr(sampler, 'seed', None)
