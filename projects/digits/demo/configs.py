"""The digits configs as the demo runs them, and the equivalent tools/train.py and test.py commands."""
from __future__ import annotations

import os.path as osp
import shlex
import time

from mmengine.config import Config

from expand_mm.schedule import scale_schedule

from .tasks import QUICK_BATCH, QUICK_ITERS, REPO_ROOT, TaskSpec


def data_root_overrides(task: str, data_root: str) -> dict[str, str]:
    """The config keys that point a digits config at ``data_root``, and their values.

    One source for both the demo's configs and the equivalent ``--cfg-options``
    of the commands it prints.
    """
    root = data_root.rstrip('/') + '/'
    overrides = {f'{loader}.dataset.data_root': root
                 for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    if task == 'det':
        # The CocoMetric's ann_file was resolved from the base's data_root
        # when the config was parsed (see projects/digits/configs/_base_/datasets/digits_det.py).
        overrides.update({f'{evaluator}.ann_file': root + 'annotations/instances_val.json'
                          for evaluator in ('val_evaluator', 'test_evaluator')})
    return overrides


def _scale_schedule(cfg: Config, max_iters: int) -> None:
    """Shrink the iteration-based schedule of ``cfg`` to ``max_iters``, proportionally."""
    scale_schedule(cfg, max_iters / cfg.train_cfg.max_iters)
    cfg.train_cfg.val_interval = max_iters
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = max(1, min(cfg.default_hooks.logger.interval,
                                                   max_iters // 3))
    cfg.log_processor.window_size = cfg.default_hooks.logger.interval


def _quick_loaders(cfg: Config) -> None:
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader:
            loader['num_workers'] = 0
            loader['persistent_workers'] = False
    cfg.train_dataloader.batch_size = QUICK_BATCH
    if 'batch_sampler' in cfg.train_dataloader:
        # AspectRatioBatchSampler drops nothing but needs a full batch per group.
        cfg.train_dataloader.batch_sampler = None


def demo_cfg(path: str, task: str, data_root: str, work_dir: str, seed: int, quick: bool,
             run_name: str, train: bool) -> Config:
    """Loads a digits config and points it at the demo's data, work dir and seed.

    Args:
        path: Config file.
        task: ``'det'`` or ``'seg'``.
        data_root: Dataset root of this task (``.../digits_det``).
        work_dir: The run's work dir.
        seed: Training seed.
        quick: Shrink the schedule and the loaders for the smoke test.
        run_name: Unique name of the run (experiment and visualiser name).
        train: For training the in-training validation is dropped -- the demo
            evaluates the deployed checkpoints afterwards, with the compact config.

    Returns:
        The config, ready for ``Runner.from_cfg``.
    """
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(data_root_overrides(task, data_root))
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=seed)
    # MMEngine's Runner names its logger, message hub and visualiser after
    # these; several runners in one process must not share them (a shared
    # visualiser would write every run's scalars into the first run's log dir).
    cfg.experiment_name = run_name  # the Runner appends its timestamp
    cfg.visualizer['name'] = f'{run_name}_{time.strftime("%Y%m%d_%H%M%S")}'
    if quick:
        _scale_schedule(cfg, QUICK_ITERS)
        _quick_loaders(cfg)
    if train:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
        cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    return cfg


def data_root_options(spec: TaskSpec, data_root: str) -> str:
    """``--cfg-options`` that point a digits config at ``data_root`` (empty if it already does).

    Args:
        spec: The task.
        data_root: The task's dataset root used by the demo.

    Returns:
        ``key=value`` pairs separated by spaces, or ``''``.
    """
    default = Config.fromfile(spec.compact_config).train_dataloader.dataset.data_root
    if osp.normpath(osp.abspath(default)) == osp.normpath(osp.abspath(data_root)):
        return ''
    return ' '.join(f'{key}={shlex.quote(value)}'
                    for key, value in data_root_overrides(spec.name, data_root).items())


def train_command(spec: TaskSpec, variant: str, work_dir: str, seed: int,
                  data_root: str) -> str:
    """The ``tools/train.py`` command equivalent to one training of the demo."""
    config = spec.compact_config if variant == 'compact' else spec.expandnet_config
    options = ' '.join(filter(None, [f'randomness.seed={seed}',
                                     data_root_options(spec, data_root)]))
    return (f'python tools/train.py {osp.relpath(config, REPO_ROOT)} --work-dir '
            f'{shlex.quote(work_dir)} --cfg-options {options}')


def test_command(spec: TaskSpec, ckpt: str, work_dir: str, data_root: str) -> str:
    """The ``tools/test.py`` command equivalent to one evaluation of the demo."""
    options = data_root_options(spec, data_root)
    return (f'python tools/test.py {osp.relpath(spec.compact_config, REPO_ROOT)} '
            f'{shlex.quote(ckpt)} --work-dir {shlex.quote(work_dir)}'
            + (f' --cfg-options {options}' if options else ''))
