"""Hooks that connect ExpandNets to MMEngine's checkpointing."""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Mapping, Sequence

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.registry import HOOKS, OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.runner import find_latest_checkpoint
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (NONLINEAR_INIT_META_KEY, CheckpointError, match_state_dict,
                          read_checkpoint, strip_prefix)
from ..deploy import (DEFAULT_PROBE_SHAPE, PlantingBakeError, compact_checkpoint_path,
                      find_deployable, planting_stage, unfinished_planting, unwrap_model,
                      write_compact_checkpoint)
from ..models.distributed import ExpandNetDistributedDataParallel
from ..models.expandnet import deferring_expandnet
from ..optim.factor_lr import EXPANDNET_PARAMWISE_KEYS, ExpandNetOptimWrapperConstructor
from ..optim.schedule_check import absolute_floor_problems
from ..surgery import expanded_layers


def check_constructor_for_paramwise_keys(optim_wrapper_cfg: Any) -> None:
    """Refuse ExpandNet ``paramwise_cfg`` keys given to a constructor that ignores them.

    MMEngine's default constructor drops unknown ``paramwise_cfg`` keys, so
    ``factor_lr_mult`` or ``weight_decay_on`` without
    ``constructor='ExpandNetOptimWrapperConstructor'`` would silently train
    with the defaults.
    """
    if not isinstance(optim_wrapper_cfg, Mapping):
        return
    used = [k for k in (optim_wrapper_cfg.get('paramwise_cfg') or {})
            if k in EXPANDNET_PARAMWISE_KEYS]
    constructor = optim_wrapper_cfg.get('constructor')
    cls = (constructor if isinstance(constructor, type) else
           OPTIM_WRAPPER_CONSTRUCTORS.get(constructor) if isinstance(constructor, str) else None)
    ours = isinstance(cls, type) and issubclass(cls, ExpandNetOptimWrapperConstructor)
    if used and not ours:
        raise ValueError(f'optim_wrapper.paramwise_cfg sets {used}, which only '
                         "constructor='ExpandNetOptimWrapperConstructor' reads, but the "
                         f'constructor is {constructor or "the default"!r}: add '
                         "optim_wrapper=dict(constructor='ExpandNetOptimWrapperConstructor')")


@HOOKS.register_module()
class ContractCheckpointHook(Hook):
    """Write a stock compact checkpoint beside every checkpoint the runner saves.

    Acts after ``CheckpointHook`` (priority ``LOWEST``) at the end of every
    train iteration / epoch, validation epoch and of training: when MMEngine's
    message hub names a new ``last_ckpt`` or ``best_ckpt*``, the file is read
    back (so what is contracted is exactly what was saved: with ``EMAHook`` on,
    the saved ``state_dict`` already holds the EMA weights), contracted, checked
    on a probe input, and written as ``<name>_compact.pth``. When
    ``CheckpointHook`` removes a checkpoint (``max_keep_ckpts``, a replaced
    ``best_*``), its compact twin is removed too; a checkpoint that disappears
    otherwise (moved by hand) keeps its twin, with a warning. Only the main process writes;
    nothing here uses collective calls, so DDP cannot hang. Checkpoints on
    remote storage backends are not contracted (a warning says so); use
    ``tools/contract.py`` on a local copy.

    With a training-time wrapper (``type='Distiller'``, ``type='AuxOverParam'``,
    anything implementing ``deployable_model()``) only the deployable network's
    entries are kept (no teacher, adapters or auxiliary branch); they are
    contracted when it is an ExpandNet and written as they are when it is a
    plain compact model.

    At the start of training it also warns when a learning-rate scheduler
    with an absolute ``eta_min`` would undo the per-factor learning rates of
    :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor`
    (:func:`~expand_mm.optim.schedule_check.absolute_floor_problems`).

    Args:
        suffix: Added to the checkpoint's stem.
        probe_shape: Input shape of the contraction check (NCHW).
        rtol: A relative error above this raises instead of writing, unless a
            float64 re-check shows float32 rounding (then a warning says so;
            see :func:`~expand_mm.surgery.check_contraction`).
        verify: Run the contraction check (logged with its error).
    """

    priority = 'LOWEST'

    def __init__(self, suffix: str = '_compact',
                 probe_shape: Sequence[int] = DEFAULT_PROBE_SHAPE,
                 rtol: float = 1e-4, verify: bool = True) -> None:
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f'ContractCheckpointHook: suffix={suffix!r} must be a non-empty '
                             "string (the compact copy of iter_N.pth is iter_N{suffix}.pth; "
                             "default '_compact'): with none it would overwrite its source")
        if len(tuple(probe_shape)) != 4 or not all(
                isinstance(d, int) and d > 0 for d in probe_shape):
            raise ValueError(f'ContractCheckpointHook: probe_shape={probe_shape!r} must be an '
                             'NCHW shape of four positive ints, e.g. (1, 3, 128, 128)')
        self.suffix = suffix
        self.probe_shape = tuple(probe_shape)
        self.rtol = rtol
        self.verify = verify
        self._done: dict[str, str | None] = {}  # None: skipped (nonlinear phase)
        self._origin: dict[str, str] = {}  # src -> the message-hub key it was published under
        self._warned_remote = False
        self._warned_nonlinear = False
        self._warned_planting = False
        self._plain_planting = False
        self._said_last_stage = False

    def before_train(self, runner) -> None:
        """Check there is something to write, the schedule and the DDP wrapper; remember
        the resumed checkpoint.

        A plain model without expanded layers has no compact form other than
        its own checkpoint, so the hook refuses it, unless a ``ChannelPlantingHook``
        plants it (checkpoints before the last stage get the stage's narrower
        network); a training-time wrapper always has one (its deployable part),
        expanded or not. A stock DDP
        wrapper around an ExpandNet that would defer its factor gradients gets
        a warning naming ``ExpandNetDistributedDataParallel``.
        """
        deployable, prefix = find_deployable(runner.model)
        # A plain model being planted has a compact form until its last stage: the
        # narrower network of the stage each checkpoint was saved at.
        hooks = getattr(runner, 'hooks', ())  # runner-like callers may have none
        self._plain_planting = not prefix and not expanded_layers(deployable) and any(
            type(hook).__name__ == 'ChannelPlantingHook' for hook in hooks)
        if not prefix and not expanded_layers(deployable) and not self._plain_planting:
            raise ValueError(
                'ContractCheckpointHook: the model has no expanded layer and is not a '
                "training-time wrapper; use model=dict(type='ExpandNet', model=..., ...) "
                "(or a wrapper such as type='Distiller' / 'AuxOverParam') in the config "
                '(with a ChannelPlantingHook it writes the compact copies of the stages)')
        if prefix:
            runner.logger.info(
                f'ContractCheckpointHook: the compact checkpoints hold the {prefix!r} entries '
                f'of {type(unwrap_model(runner.model)).__name__} ('
                f'{type(deployable).__name__}, '
                + ('contracted)' if expanded_layers(deployable) else 'no expanded layer: as '
                   'they are)'))
        cfg = getattr(runner, 'cfg', None)  # a Runner's; runner-like callers may have none
        check_constructor_for_paramwise_keys(cfg.get('optim_wrapper') if cfg else None)
        # Every ExpandNet config carries this hook, so it is where a schedule
        # that silently undoes the per-factor learning rates gets reported.
        for problem in absolute_floor_problems(unwrap_model(runner.model), runner.optim_wrapper,
                                               runner.param_schedulers):
            runner.logger.warning(f'ContractCheckpointHook: {problem}')
        # Under DDP only a wrapper that makes the switch defers factor gradients.
        if (isinstance(runner.model, DistributedDataParallel)
                and not isinstance(runner.model, ExpandNetDistributedDataParallel)
                and deferring_expandnet(runner.model) is not None):
            suggestion = ("dict(type='ExpandNetDistributedDataParallel', static_graph=True) "
                          '(in place of find_unused_parameters=True; torch DDP refuses it with '
                          'gradient accumulation)'
                          if runner.model.find_unused_parameters else
                          "dict(type='ExpandNetDistributedDataParallel')")
            runner.logger.warning(
                f'ContractCheckpointHook: {type(runner.model).__name__} runs its own train '
                'step, so the ExpandNet trains with plain autograd (same gradients, higher '
                f'peak memory); set model_wrapper_cfg={suggestion} to defer the factor '
                'gradients as on one device')
        resumed = runner.message_hub.get_info('last_ckpt')
        if resumed and osp.isfile(compact_checkpoint_path(resumed, self.suffix)):
            self._done[resumed] = compact_checkpoint_path(resumed, self.suffix)
            self._origin[resumed] = 'last_ckpt'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        """Contract a checkpoint saved at this iteration."""
        self._contract_new(runner)

    def after_train_epoch(self, runner) -> None:
        """Contract a checkpoint saved at this epoch."""
        self._contract_new(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        """Contract a new best checkpoint."""
        self._contract_new(runner)

    def after_train(self, runner) -> None:
        """Contract the last checkpoint."""
        self._contract_new(runner)

    def _saved_paths(self, runner) -> list[tuple[str, str]]:
        info = runner.message_hub.runtime_info
        return [(k, v) for k, v in info.items()
                if (k == 'last_ckpt' or k.startswith('best_ckpt')) and isinstance(v, str)]

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
        hook = next((h for h in getattr(runner, 'hooks', [])
                     if isinstance(h, CheckpointHook)), None)
        keep = info.get('keep_ckpt_ids')
        if hook is None or not getattr(hook, 'max_keep_ckpts', 0) > 0 or keep is None:
            return False
        template = getattr(hook, 'filename_tmpl', None)
        if not isinstance(template, str):
            return False
        return osp.basename(src) not in {template.format(step) for step in keep}

    def _contract_new(self, runner) -> None:
        if not is_main_process():
            return
        for src, dst in list(self._done.items()):
            if osp.exists(src):
                continue
            if dst is not None and osp.isfile(dst):
                if self._retired(runner, src):  # CheckpointHook dropped it: drop its twin
                    os.remove(dst)
                else:  # moved or deleted by someone else: the twin may be all that is left
                    runner.logger.warning(f'ContractCheckpointHook: {src} is gone, but not by '
                                          f'CheckpointHook; its compact copy {dst} is kept')
            del self._done[src]
            self._origin.pop(src, None)
        for key, path in self._saved_paths(runner):
            if path in self._done:
                continue
            if not osp.isfile(path):
                if '://' in path and not self._warned_remote:
                    runner.logger.warning(f'ContractCheckpointHook: {path} is on a remote '
                                          'backend; only local checkpoints are contracted')
                    self._warned_remote = True
                continue
            # Memory-mapped: only the meta is read here.
            meta = read_checkpoint(path, mmap=True).get('meta') or {}
            self._origin[path] = key
            if meta.get(NONLINEAR_INIT_META_KEY):
                # Saved while NonlinearInitHook had a nonlinearity between the
                # sub-layers: the chains are not linear, there is nothing to
                # contract. Remembered (twin None) so it is not looked at again.
                self._done[path] = None
                log = runner.logger.info if self._warned_nonlinear else runner.logger.warning
                self._warned_nonlinear = True
                log(f'ContractCheckpointHook: {path} was saved during the nonlinear phase '
                    'of NonlinearInitHook (a nonlinearity between the sub-layers) and has no '
                    'compact equivalent; not contracted. Checkpoints saved after the '
                    'nonlinearity is removed are contracted as usual')
                continue
            planting = unfinished_planting(meta)
            if self._plain_planting and not planting:
                # The last stage of a plain model is the stock model: the checkpoint
                # is its own compact form.
                self._done[path] = None
                if not self._said_last_stage:
                    self._said_last_stage = True
                    runner.logger.info(f'ContractCheckpointHook: {path} was saved at the last '
                                       'planting stage: it is the stock model as it is (so '
                                       'are the checkpoints after it)')
                continue
            try:
                dst, errors = write_compact_checkpoint(
                    runner.model, path, compact_checkpoint_path(path, self.suffix),
                    self.probe_shape, self.rtol, self.verify)
            except PlantingBakeError as err:
                # Training goes on; only this stage's checkpoints lack a compact twin.
                self._done[path] = None
                log = runner.logger.info if self._warned_planting else runner.logger.warning
                self._warned_planting = True
                log(f'ContractCheckpointHook: not contracted: {err}')
                continue
            self._done[path] = dst
            if planting:
                runner.logger.info(
                    f'ContractCheckpointHook: wrote compact checkpoint {dst}: the network of '
                    f'{planting_stage(planting)}, unplanted channels zeroed (masked vs zeroed '
                    f'on the probe: relative {errors["max_rel"]:.2e})')
                continue
            if errors and 'float64_max_rel' in errors:
                runner.logger.warning(
                    f'ContractCheckpointHook: wrote compact checkpoint {dst}. In float32 the '
                    f'compact and the expanded model differ by {errors["max_rel"]:.2e} '
                    f'(relative) on the probe, above rtol={self.rtol:g}; in float64 (explicit '
                    f'chains against the contraction) by {errors["float64_max_rel"]:.2e}: the '
                    'contraction is right and the network amplifies float32 rounding, as it '
                    'does for any float32 copy of it (common early in training, while '
                    "BatchNorm's running statistics lag the weights)")
                continue
            if errors and 'layers_max_rel' in errors:
                check = (f'the probe output barely depends on the input (e.g. untrained batch '
                         f'norm statistics), so each expanded layer was checked on its own: max '
                         f'relative error {errors["layers_max_rel"]:.2e}')
            elif errors:
                check = (f'max abs error {errors["max_abs"]:.2e}, relative '
                         f'{errors["max_rel"]:.2e}')
            elif self.verify and not expanded_layers(find_deployable(runner.model)[0]):
                check = 'no expanded layer: the deployable part as it is'
            else:
                check = 'not verified'
            runner.logger.info(f'ContractCheckpointHook: wrote compact checkpoint {dst} '
                               f'({check})')


def _article(word: str) -> str:
    return 'an' if word[:1] in 'aeiou' else 'a'


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
            runner's missing-key warnings.
    """

    priority = 'VERY_HIGH'

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict

    def before_run(self, runner) -> None:
        """Refuse a missing or corrupt ``load_from`` file with a clear message.

        MMEngine would otherwise fail inside ``torch.load`` with a pickle or
        zip error; the file is memory-mapped, not read, so this costs little.
        When the run resumes, a distiller's teacher may come from the resumed
        checkpoint (``Distiller.expect_teacher_from_resume``), so its
        ``teacher_ckpt`` file need not exist any more.
        """
        load_from = runner._load_from
        if isinstance(load_from, str) and '://' not in load_from:
            read_checkpoint(load_from, mmap=True)
        # A resumed distiller checkpoint holds the teacher: its own file may be gone.
        # Only when there is something to resume (auto-resume may find nothing).
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
        deployable, prefix = find_deployable(runner.model)
        if not prefix and not expanded_layers(deployable):
            return
        resumed = runner._load_from or find_latest_checkpoint(runner.work_dir)
        source = (str(runner._load_from or 'the loaded checkpoint') if not runner._resume
                  else f'resumed checkpoint {resumed!r}' if resumed
                  else 'resumed checkpoint (the latest in the work dir)')
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
                "load it non-strictly: custom_hooks=[dict(type='ExpandCheckpointLoadHook', "
                'strict=False), ...]') from None
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
        runner.logger.info(f'ExpandCheckpointLoadHook: {source} is {_article(kind)} {kind} '
                           'checkpoint'
                           + (' (factorised exactly into the expanded layers)'
                              if kind == 'compact' and expanded_layers(deployable) else ''))
