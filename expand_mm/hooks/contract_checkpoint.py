"""``ContractCheckpointHook``: a stock compact checkpoint beside every saved one."""
from __future__ import annotations

import os.path as osp
from typing import Any, Sequence

from mmengine.dist import is_main_process
from mmengine.fileio import get_file_backend
from mmengine.hooks import CheckpointHook, EMAHook, Hook
from mmengine.registry import HOOKS
from torch import nn

from ..checkpoint import NONLINEAR_INIT_META_KEY
from ..cost import config_input_size
from ..deploy import compact_checkpoint, compact_checkpoint_path, save_checkpoint_file
from ..errors import ConfigError, NonFiniteError
from ..models.deployable import find_deployable, unwrap_model
from ..planting import PlantingBakeError, planting_stage, unfinished_planting
from ..probe import DEFAULT_PROBE_SHAPE
from ..surgery import expanded_layers
from ..verification import listed, non_finite_entries
from .channel_planting import ChannelPlantingHook
from .safe_checkpoint import step_pattern


def _saved_path_keys(info: dict) -> dict[str, str]:
    """The message hub's entries naming checkpoints: ``last_ckpt`` and ``best_ckpt*``."""
    return {k: v for k, v in info.items()
            if (k == 'last_ckpt' or k.startswith('best_ckpt')) and isinstance(v, str)}


@HOOKS.register_module()
class ContractCheckpointHook(Hook):
    """Write a stock compact checkpoint beside every checkpoint the runner saves.

    Acts in ``before_save_checkpoint``, with priority ``LOWEST`` so it runs
    after every hook that edits the checkpoint (``EMAHook`` swaps in the
    averaged weights, ``NonlinearInitHook`` and ``ChannelPlantingHook`` mark
    the meta). The compact form is made from the model in memory -- the EMA
    model when an ``EMAHook`` is on, the trained one otherwise -- without
    reading any file back or copying the expanded network, checked on a probe
    input, and written as ``<name>_compact.pth`` through MMEngine's file
    backend for that path (a local disk, or any backend ``CheckpointHook``
    writes to: the same ``backend_args``). The checkpoint being saved is the
    one ``CheckpointHook`` has just named in the message hub (``last_ckpt``,
    ``best_ckpt*``).

    A model holding a NaN or an Inf (training has diverged) stops the run
    before the checkpoint or its twin is written, and before an older twin
    is removed; the error names the tensors, the iteration and the
    checkpoint to go on from.

    When ``CheckpointHook`` removes a checkpoint (``max_keep_ckpts``, a
    replaced ``best_*``), its compact twin is removed at the next save; a
    checkpoint that disappears otherwise (moved by hand) keeps its twin, with
    a warning. Only the main process writes; nothing here uses collective
    calls, so DDP cannot hang.

    With a training-time wrapper (``type='Distiller'``, ``type='AuxOverParam'``,
    anything in the protocol of :mod:`expand_mm.models.deployable`) only the
    deployable network's entries are kept; they are contracted when it is an
    ExpandNet and written as they are when it is a plain compact model.

    Args:
        suffix: Added to the checkpoint's stem.
        probe_shape: Input shape of the contraction check (NCHW). None: the
            config's test input size (as ``tools/contract.py`` finds it, each
            side at most 512; a network such as SSD300 runs at no smaller
            size), else ``DEFAULT_PROBE_SHAPE``.
        rtol: A relative error above this raises instead of writing, unless a
            float64 re-check shows float32 rounding (then a warning says so;
            see :func:`~expand_mm.surgery.check_contraction`).
        verify: Run the contraction check (logged with its error).
    """

    priority = 'LOWEST'

    def __init__(self, suffix: str = '_compact',
                 probe_shape: Sequence[int] | None = None,
                 rtol: float = 1e-4, verify: bool = True) -> None:
        if not isinstance(suffix, str) or not suffix:
            raise ConfigError(f'ContractCheckpointHook: suffix={suffix!r} must be a non-empty '
                              "string (the compact copy of iter_N.pth is iter_N{suffix}.pth; "
                              "default '_compact'): with none it would overwrite its source")
        if probe_shape is not None and (len(tuple(probe_shape)) != 4 or not all(
                isinstance(d, int) and d > 0 for d in probe_shape)):
            raise ConfigError(f'ContractCheckpointHook: probe_shape={probe_shape!r} must be an '
                              'NCHW shape of four positive ints, e.g. (1, 3, 128, 128)')
        self.suffix = suffix
        self.probe_shape = None if probe_shape is None else tuple(probe_shape)
        self.rtol = rtol
        self.verify = verify
        self._twins: dict[str, str | None] = {}  # saved checkpoint -> its twin (None: none)
        self._origin: dict[str, str] = {}  # saved checkpoint -> its message-hub key
        self._named: dict[str, str] = {}  # the message hub's checkpoint names at the last save
        self._plain_planting = False
        self._saved = False  # a twin was written since the retired twins were last dropped
        self._said: set[str] = set()  # one-time notices already logged at warning level

    def before_train(self, runner) -> None:
        """Refuse a model with no compact form; take over the twins of a resumed run.

        A plain model without expanded layers has no compact form other than
        its own checkpoint, so it is refused, unless a ``ChannelPlantingHook``
        plants it (checkpoints before the last stage get the stage's narrower
        network); a training-time wrapper always has one (its deployable part).
        """
        if self.probe_shape is None:
            size = config_input_size(runner.cfg)
            self.probe_shape = ((1, 3, *(min(side, 512) for side in size[0])) if size
                                else DEFAULT_PROBE_SHAPE)
        deployable, prefix = find_deployable(runner.model)
        expanded = bool(expanded_layers(deployable))
        self._plain_planting = not prefix and not expanded and any(
            isinstance(hook, ChannelPlantingHook) for hook in getattr(runner, 'hooks', ()))
        if not prefix and not expanded and not self._plain_planting:
            raise ConfigError(
                'ContractCheckpointHook: the model has no expanded layer and is not a '
                "training-time wrapper; use model=dict(type='ExpandNet', model=..., ...) "
                "(or a wrapper such as type='Distiller' / 'AuxOverParam') in the config "
                '(with a ChannelPlantingHook it writes the compact copies of the stages)')
        if prefix:
            runner.logger.info(
                f'ContractCheckpointHook: the compact checkpoints hold the {prefix!r} entries '
                f'of {type(unwrap_model(runner.model)).__name__} ({type(deployable).__name__}, '
                + ('contracted)' if expanded else 'no expanded layer: as they are)'))
        self._named = _saved_path_keys(runner.message_hub.runtime_info)
        resumed = self._named.get('last_ckpt')
        if resumed and is_main_process():
            self._take_over_twins(runner, resumed)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Remove the twins of the checkpoints removed by the save of this iteration."""
        self._drop_twins_after_save(runner)

    def after_train_epoch(self, runner) -> None:
        """Remove the twins of the checkpoints removed by the save of this epoch."""
        self._drop_twins_after_save(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        """Remove the twin of a ``best_*`` checkpoint replaced after this validation."""
        self._drop_twins_after_save(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Write the compact twin of the checkpoint being saved (main process only).

        Raises:
            NonFiniteError: If the model holds a NaN or an Inf: neither the
                checkpoint nor its twin is written, and the run stops.
        """
        if not is_main_process():
            return
        self._refuse_non_finite_weights(runner, checkpoint)
        self._drop_retired_twins(runner)
        self._saved = True
        saving = self._checkpoint_being_saved(runner)
        if saving is None:
            return
        key, path = saving
        self._origin[path] = key
        self._twins[path] = self._write_twin(runner, checkpoint.get('meta') or {}, path)

    def _drop_twins_after_save(self, runner) -> None:
        """After a save, remove the twins of the checkpoints it retired.

        ``SafeCheckpointHook`` removes a retired checkpoint once the new one is
        complete, after ``before_save_checkpoint``; its twin goes right after
        it (this hook acts after ``CheckpointHook``), never before.
        """
        if self._saved and is_main_process():
            self._saved = False
            self._drop_retired_twins(runner)

    def _take_over_twins(self, runner, resumed: str) -> None:
        """On resume, track the twins of the run's checkpoints; remove the orphaned ones.

        A twin whose checkpoint exists is tracked, so it is removed with its
        checkpoint when ``max_keep_ckpts`` retires it later in this run. A kill
        can fall between the removal of a retired checkpoint and that of its
        twin, or between a twin and its checkpoint's completion; such a twin
        (of a ``max_keep_ckpts``-retired or replaced ``best_*`` checkpoint, or
        of a step after the resumed one) is removed. The twin of a checkpoint
        that disappeared otherwise (moved by hand) is kept.
        """
        # CheckpointHook (acting before this hook) has resolved its out_dir: the run may
        # have been moved since it named the resumed checkpoint.
        directory = getattr(self._checkpoint_hook(runner), 'out_dir', None) or osp.dirname(resumed)
        backend = self._backend(runner, directory)
        ending = self.suffix + '.pth'
        named = {path: key for key, path in self._named.items()}
        orphans = []
        for name in sorted(backend.list_dir_or_file(directory, list_dir=False)):
            if not name.endswith(ending):
                continue
            twin = backend.join_path(directory, name)
            source = backend.join_path(directory, name[:-len(ending)] + '.pth')
            if backend.exists(source):
                self._twins.setdefault(source, twin)
                self._origin.setdefault(source, named.get(source, 'last_ckpt'))
            elif self._abandoned(runner, source, resumed):
                orphans.append(twin)
        for path in orphans:
            backend.remove(path)
        if orphans:
            runner.logger.info('ContractCheckpointHook: removed the compact copies of '
                               'checkpoints that no longer exist: '
                               + ', '.join(osp.basename(p) for p in orphans))

    def _abandoned(self, runner, source: str, resumed: str) -> bool:
        """Whether the missing checkpoint ``source`` was retired or never completed."""
        name = osp.basename(source)
        if name.startswith('best_'):
            return source not in _saved_path_keys(runner.message_hub.runtime_info).values()
        hook = self._checkpoint_hook(runner)
        template = getattr(hook, 'filename_tmpl', None)
        if not isinstance(template, str):
            return False
        pattern = step_pattern(template)
        step, resumed_step = pattern.match(name), pattern.match(osp.basename(resumed))
        if step is None:
            return False
        if resumed_step is not None and int(step.group(1)) > int(resumed_step.group(1)):
            return True  # written by a save the kill interrupted
        return self._retired(runner, source)

    def _refuse_non_finite_weights(self, runner, checkpoint: dict) -> None:
        """Stop the run, before anything is written or removed, if training has diverged.

        Looks at the weights being written (the EMA weights when ``EMAHook``
        has swapped them in, and its ``ema_state_dict``). The message names the
        non-finite tensors, the iteration, and the last checkpoint written
        before it (or, when ``max_keep_ckpts`` has removed it, its compact
        copy, which this check runs early enough to keep).
        """
        bad = non_finite_entries(checkpoint.get('state_dict') or {}) + [
            f'ema_state_dict.{key}'
            for key in non_finite_entries(checkpoint.get('ema_state_dict') or {})]
        if not bad:
            return
        meta = checkpoint.get('meta') or {}
        when = f'iteration {meta.get("iter", runner.iter + 1)}' + (
            f' (epoch {meta["epoch"]})' if meta.get('epoch') else '')
        named = _saved_path_keys(runner.message_hub.runtime_info)
        saving = next((v for k, v in named.items() if self._named.get(k) != v), None)
        raise NonFiniteError(
            f'ContractCheckpointHook: at {when} the model holds NaN or Inf in '
            f'{len(bad)} tensor{"s" * (len(bad) != 1)}: {listed(bad)}. Training has '
            f'diverged: neither {saving or "the checkpoint"} nor its compact copy is written, and '
            f'the run stops here. {self._way_back(runner)}')

    def _way_back(self, runner) -> str:
        """Where a diverged run can go on from: the last checkpoint saved before."""
        earlier = self._named.get('last_ckpt')
        advice = ('with a lower learning rate or gradient clipping '
                  '(optim_wrapper.clip_grad=dict(max_norm=...))')
        if earlier is None:
            return f'No checkpoint was saved before it: start again {advice}.'
        if self._backend(runner, earlier).isfile(earlier):
            return (f'Resume from {earlier}, the last checkpoint saved before it (python '
                    f'tools/train.py CONFIG --resume {earlier}, or resume=True and '
                    f"load_from='{earlier}'), {advice}.")
        twin = self._twins.get(earlier) or self._twin_path(earlier)
        kept = twin if self._backend(runner, twin).isfile(twin) else None
        return (f'The last checkpoint saved before it, {earlier}, was removed (max_keep_ckpts)'
                + (f'; its compact copy {kept} is kept: start from it with '
                   f"load_from='{kept}' (the weights, without the optimizer state) "
                   if kept else '; resume from an older checkpoint if you kept one, or start '
                   'again ') + f'{advice}.')

    def _twin_path(self, path: str) -> str:
        return compact_checkpoint_path(path, self.suffix)

    def _checkpoint_hook(self, runner) -> CheckpointHook | None:
        return next((h for h in getattr(runner, 'hooks', ()) if isinstance(h, CheckpointHook)),
                    None)

    def _backend_args(self, runner) -> dict | None:
        """``CheckpointHook``'s ``backend_args``: the twin goes where its source goes."""
        return getattr(self._checkpoint_hook(runner), 'backend_args', None)

    def _backend(self, runner, path: str) -> Any:
        return get_file_backend(path, backend_args=self._backend_args(runner))

    def _checkpoint_being_saved(self, runner) -> tuple[str, str] | None:
        """``(message-hub key, path)`` of the checkpoint being saved, or None.

        ``CheckpointHook`` names each checkpoint in the message hub just before
        saving it; a name that did not change is a re-save of the same weights
        (after a new best, the last checkpoint is saved again to record it),
        whose twin is already written. A save outside ``CheckpointHook``
        names no file and gets no twin (said once).
        """
        named = _saved_path_keys(runner.message_hub.runtime_info)
        changed = [(k, v) for k, v in named.items() if self._named.get(k) != v]
        self._named = named
        if not changed:
            if not named:
                self._say_once(runner, 'unnamed', 'a checkpoint saved outside CheckpointHook '
                               'names no file in the message hub: it gets no compact twin '
                               '(python tools/contract.py CONFIG CKPT OUT makes one)')
            return None
        changed.sort(key=lambda item: not item[0].startswith('best_ckpt'))
        return changed[0]

    def _source_model(self, runner) -> nn.Module:
        """The EMA model when an ``EMAHook`` is on (its weights are the ones saved)."""
        ema = next((h for h in getattr(runner, 'hooks', ()) if isinstance(h, EMAHook)), None)
        ema_model = getattr(ema, 'ema_model', None)
        return ema_model.module if ema_model is not None else runner.model

    def _write_twin(self, runner, meta: dict, path: str) -> str | None:
        """Write ``path``'s compact twin and log it; None when it has none."""
        if meta.get(NONLINEAR_INIT_META_KEY):
            self._say_once(runner, 'nonlinear', f'{path} was saved during the nonlinear phase '
                           'of NonlinearInitHook (a nonlinearity between the sub-layers) and '
                           'has no compact equivalent; not contracted. Checkpoints saved after '
                           'the nonlinearity is removed are contracted as usual')
            return None
        planting = unfinished_planting(meta)
        if self._plain_planting and not planting:
            self._say_once(runner, 'last-stage', f'{path} was saved at the last planting stage: '
                           'it is the stock model as it is (so are the checkpoints after it)',
                           level='info')
            return None
        try:
            compact, errors = compact_checkpoint(
                self._source_model(runner), meta, path, probe_shape=self.probe_shape,
                rtol=self.rtol, verify=self.verify)
        except PlantingBakeError as err:
            # Training goes on; only this stage's checkpoints lack a compact twin.
            self._say_once(runner, 'planting', f'not contracted: {err}')
            return None
        dst = self._twin_path(path)
        save_checkpoint_file(compact, dst, self._backend_args(runner))
        runner.logger.info(f'ContractCheckpointHook: wrote compact checkpoint {dst}'
                           + self._describe_check(runner, errors, planting))
        return dst

    def _describe_check(self, runner, errors: dict | None, planting: dict | None) -> str:
        """What the contraction check found, for the log line."""
        if planting:
            return (f': the network of {planting_stage(planting)}, unplanted channels zeroed '
                    f'(masked vs zeroed on the probe: relative {errors["max_rel"]:.2e})')
        if errors and 'float64_max_rel' in errors:
            return (f'. In float32 the compact and the expanded model differ by '
                    f'{errors["max_rel"]:.2e} (relative) on the probe, above rtol={self.rtol:g}; '
                    f'in float64 (explicit chains against the contraction) by '
                    f'{errors["float64_max_rel"]:.2e}: the contraction is right and the network '
                    'amplifies float32 rounding, as it does for any float32 copy of it (common '
                    "early in training, while BatchNorm's running statistics lag the weights)")
        if errors and 'layers_max_rel' in errors:
            return (f' (the probe output barely depends on the input (e.g. untrained batch '
                    f'norm statistics), so each expanded layer was checked on its own: max '
                    f'relative error {errors["layers_max_rel"]:.2e})')
        if errors:
            return f' (max abs error {errors["max_abs"]:.2e}, relative {errors["max_rel"]:.2e})'
        if self.verify and not expanded_layers(find_deployable(runner.model)[0]):
            return ' (no expanded layer: the deployable part as it is)'
        return ' (not verified)'

    def _say_once(self, runner, topic: str, message: str, level: str = 'warning') -> None:
        """Log a notice that repeats at every save once: a warning (or info) the first
        time; after that a warning becomes info and an info is not repeated."""
        first = topic not in self._said
        self._said.add(topic)
        if level == 'warning':
            log = runner.logger.warning if first else runner.logger.info
        elif first:
            log = runner.logger.info
        else:
            return
        log(f'ContractCheckpointHook: {message}')

    def _drop_retired_twins(self, runner) -> None:
        """Remove the twins of checkpoints that ``CheckpointHook`` removed."""
        for src, dst in list(self._twins.items()):
            backend = self._backend(runner, src)
            if backend.exists(src):
                continue
            if dst is not None and backend.isfile(dst):
                if self._retired(runner, src):
                    backend.remove(dst)
                else:  # moved or deleted by someone else: the twin may be all that is left
                    runner.logger.warning(f'ContractCheckpointHook: {src} is gone, but not by '
                                          f'CheckpointHook; its compact copy {dst} is kept')
            del self._twins[src]
            self._origin.pop(src, None)

    def _retired(self, runner, src: str) -> bool:
        """Whether ``CheckpointHook`` removed ``src`` (``max_keep_ckpts``, a replaced best).

        A periodic checkpoint is retired when ``max_keep_ckpts`` is on and its
        file name is none of the kept steps' (the hook's ``filename_tmpl``: its
        own counter, epochs or iterations).
        """
        key = self._origin.get(src, 'last_ckpt')
        info = runner.message_hub.runtime_info
        if key.startswith('best_ckpt'):
            return info.get(key) != src
        hook = self._checkpoint_hook(runner)
        keep = info.get('keep_ckpt_ids')
        if hook is None or not getattr(hook, 'max_keep_ckpts', 0) > 0 or keep is None:
            return False
        template = getattr(hook, 'filename_tmpl', None)
        if not isinstance(template, str):
            return False
        return src.replace('\\', '/').rsplit('/', 1)[-1] not in {
            template.format(step) for step in keep}
