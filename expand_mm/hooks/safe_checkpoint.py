"""``SafeCheckpointHook``: training checkpoints that survive a kill at any moment."""
from __future__ import annotations

import os
import os.path as osp
import re

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ..checkpoint import CheckpointError, read_checkpoint

#: The file in the work dir that names the checkpoint auto-resume starts from.
LAST_CHECKPOINT = 'last_checkpoint'
#: Added to a file's name while it is being written.
TMP_SUFFIX = '.tmp'


def step_pattern(filename_tmpl: str) -> re.Pattern:
    """A regex matching the names ``filename_tmpl`` makes, the step in group 1.

    Args:
        filename_tmpl: ``CheckpointHook``'s template, e.g. ``'iter_{}.pth'``.
    """
    return re.compile(re.escape(filename_tmpl).replace(r'\{\}', r'(\d+)') + '$')


def replace_atomically(tmp: str, dst: str) -> None:
    """Move the complete local file ``tmp`` to ``dst`` in one step.

    The data are flushed to the disk first, so the renamed file is whole
    after a power loss too, not only after a kill.
    """
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def write_last_checkpoint(work_dir: str, path: str) -> None:
    """Name ``path`` in ``work_dir/last_checkpoint``, never leaving a partial name."""
    dst = osp.join(work_dir, LAST_CHECKPOINT)
    with open(dst + TMP_SUFFIX, 'w') as f:
        f.write(path)
    replace_atomically(dst + TMP_SUFFIX, dst)


def unreadable_reason(path: str) -> str | None:
    """Why the local checkpoint ``path`` cannot be resumed from, or None if it can.

    Reads the file's structure without loading the tensors (memory-mapped),
    so a truncated, empty or missing file is found cheaply.
    """
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except CheckpointError as err:
        return str(err)
    if not isinstance(checkpoint.get('meta'), dict):
        return f'{path!r} holds no meta (not a training checkpoint)'
    return None


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints survive a kill at any moment of a save.

    MMEngine's hook removes the oldest checkpoint (``max_keep_ckpts``) before
    writing the new one, writes it in place, and names it in
    ``work_dir/last_checkpoint``: a kill during the save can leave a
    truncated newest file, named as the one to resume from, and no older one.
    This hook, with the same arguments, saves in an order where every moment
    leaves a resumable run:

    1. the checkpoint is written as ``<name>.tmp`` and renamed to ``<name>``
       once complete (on a local disk; another backend, ``s3://`` or a
       ``register_backend`` one, gets the file in one ``put``, which object
       stores make visible whole or not at all);
    2. ``last_checkpoint`` is rewritten (renamed into place too) to name it;
    3. only then is the checkpoint that ``max_keep_ckpts`` retires removed.

    ``best_*`` checkpoints are saved by MMEngine's own code (they are never
    resumed from). The message hub names the new checkpoint and its kept
    steps before the save, as MMEngine's hook does, so the hooks acting in
    ``before_save_checkpoint`` (``ContractCheckpointHook``) see the final name.

    Around a resume it cleans up what a kill left:

    * ``before_run``: when auto-resuming (``resume=True`` without
      ``load_from``: ``--resume`` with no file), a ``last_checkpoint`` naming a
      missing, truncated or unreadable file is passed over, with one warning,
      for the newest checkpoint of the same directory that can be read;
    * ``before_train``: ``.tmp`` files of interrupted saves are removed, and so
      are the periodic checkpoints older than the kept ones that a kill
      stopped ``max_keep_ckpts`` from removing.

    Only the main process writes or removes files.
    """

    def before_run(self, runner) -> None:
        """Resume from the newest readable checkpoint when ``last_checkpoint``'s is not.

        Acts before the runner reads ``last_checkpoint`` (``Runner.train`` calls
        ``before_run`` hooks first) by naming the checkpoint to resume from
        as ``load_from``, on every process alike.

        Raises:
            CheckpointError: If no checkpoint beside the named one can be read.
        """
        if not runner._resume or runner._load_from is not None:
            return
        named = self._named_by_last_checkpoint(runner.work_dir)
        if named is None or '://' in named:  # nothing to resume, or not on a local disk
            return
        reason = unreadable_reason(named)
        if reason is None:
            return
        fallback = self._newest_readable(osp.dirname(named), exclude=named)
        if fallback is None:
            raise CheckpointError(
                f'{osp.join(runner.work_dir, LAST_CHECKPOINT)} names {named}, which cannot be '
                f'resumed from ({reason}), and no other checkpoint in {osp.dirname(named)} can '
                'be read: resume from a checkpoint kept elsewhere (--resume CKPT), or train '
                'again without --resume')
        runner.logger.warning(f'SafeCheckpointHook: {named} cannot be resumed from '
                              f'({reason}); resuming from {fallback}, the newest checkpoint '
                              'of the run that can be read')
        runner._load_from = fallback

    def before_train(self, runner) -> None:
        """Resolve the output dir as ``CheckpointHook`` does; remove what a kill left."""
        super().before_train(runner)
        if not is_main_process() or not self._local():
            return
        leftovers = self._interrupted_writes(runner) + self._unretired_checkpoints(runner)
        for path in leftovers:
            os.remove(path)
        if leftovers:
            runner.logger.info('SafeCheckpointHook: removed what an interrupted save left: '
                               + ', '.join(osp.basename(p) for p in leftovers))

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        """Write the checkpoint of ``step``, name it, then retire the oldest."""
        retired = self._advance_kept_steps(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        local = self._local()
        runner.save_checkpoint(
            self.out_dir, filename + TMP_SUFFIX if local else filename,
            self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        if local:
            replace_atomically(self.last_ckpt + TMP_SUFFIX, self.last_ckpt)
        write_last_checkpoint(runner.work_dir, self.last_ckpt)
        for path in retired:
            self._remove(path)

    def _advance_kept_steps(self, runner, step: int) -> list[str]:
        """Add ``step`` to the kept steps (``max_keep_ckpts``); the paths it retires.

        The message hub is updated before the save, so the new checkpoint
        records the steps kept after it; the retired files are removed by the
        caller once the new one is complete.
        """
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return []  # a re-save of the same step (a new best recorded) retires nothing
        retired = []
        if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
            retired.append(self.file_backend.join_path(
                self.out_dir, self.filename_tmpl.format(self.keep_ckpt_ids.popleft())))
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        return retired

    def _remove(self, path: str) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # checkpoints saved by DeepSpeed are directories
            self.file_backend.rmtree(path)

    def _local(self) -> bool:
        """Whether checkpoints go to a local disk (``file_client_args`` or ``backend_args``)."""
        backend = getattr(self.file_backend, 'client', self.file_backend)  # a FileClient's
        return isinstance(backend, LocalBackend)

    def _named_by_last_checkpoint(self, work_dir: str) -> str | None:
        path = osp.join(work_dir, LAST_CHECKPOINT)
        if not osp.isfile(path):
            return None
        with open(path) as f:
            return f.read().strip() or None

    def _steps_in(self, directory: str) -> dict[int, str]:
        """The periodic checkpoints in ``directory``: step -> path."""
        pattern = step_pattern(self.filename_tmpl)
        found = {}
        for name in os.listdir(directory) if osp.isdir(directory) else ():
            match = pattern.match(name)
            if match:
                found[int(match.group(1))] = osp.join(directory, name)
        return found

    def _newest_readable(self, directory: str, exclude: str) -> str | None:
        """The readable periodic checkpoint of ``directory`` with the highest step."""
        for _, path in sorted(self._steps_in(directory).items(), reverse=True):
            if osp.abspath(path) != osp.abspath(exclude) and unreadable_reason(path) is None:
                return path
        return None

    def _interrupted_writes(self, runner) -> list[str]:
        """``*.pth.tmp`` in the output dir and ``last_checkpoint.tmp``: interrupted writes."""
        found = [osp.join(self.out_dir, name) for name in sorted(os.listdir(self.out_dir))
                 if name.endswith('.pth' + TMP_SUFFIX)] if osp.isdir(self.out_dir) else []
        last = osp.join(runner.work_dir, LAST_CHECKPOINT + TMP_SUFFIX)
        return found + ([last] if osp.isfile(last) else [])

    def _unretired_checkpoints(self, runner) -> list[str]:
        """Periodic checkpoints older than the kept ones: ``max_keep_ckpts`` would have
        removed them had the run not been killed between a save and the removal."""
        if self.max_keep_ckpts <= 0 or not self.keep_ckpt_ids:
            return []
        kept = set(self.keep_ckpt_ids)
        return [path for step, path in sorted(self._steps_in(self.out_dir).items())
                if step < max(kept) and step not in kept]
