"""Train a (compact or ExpandNet) mmdet / mmseg config with the stock MMEngine Runner.

Same shape and flags as mmdet's / mmseg's ``tools/train.py``, which train
ExpandNet configs just as well (their checks run in ``ExpandNetCheckHook``).
This one adds conveniences: a missing config, checkpoint or dataset is named
before any work, a refused input ends in one ``error:`` line, and every config
gets the kill-safe checkpoints and exact resume of the ExpandNet configs::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch]
"""
import argparse
import os
import os.path as osp
import sys

import expand_mm  # noqa: F401  (registers ExpandNet, the hooks, torch.load fix)
from expand_mm.cli import UsageError, require_file, run_tool
from expand_mm.compat import type_name
from expand_mm.datasets_check import check_datasets
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def parse_args() -> argparse.Namespace:
    """Command-line arguments (mmdet / mmseg conventions)."""
    parser = argparse.ArgumentParser(description='Train a detector / segmentor (ExpandNets)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', help='enable automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatic LR scaling')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint in the work dir '
                        'when no path is given')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_cfg.max_iters=100')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line options to it."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        from mmengine.device import get_device
        if get_device() == 'cpu':  # mmengine refuses only once the model is built
            raise UsageError('--amp needs a GPU (or an NPU / MLU / MUSA device): mmengine\'s '
                             'AmpOptimWrapper does not train on the CPU')
        optim_wrapper = cfg.optim_wrapper.type
        if optim_wrapper == 'AmpOptimWrapper':
            print('AMP training is already enabled in your config.')
        elif optim_wrapper != 'OptimWrapper':
            raise UsageError(f'--amp needs optim_wrapper.type=OptimWrapper, got {optim_wrapper}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise UsageError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def _add_hook(cfg: Config, key: str, hook_type: str) -> None:
    """Give the config ``hook_type`` (as ``default_hooks[key]``) when it carries none.

    It is looked for in ``default_hooks`` and ``custom_hooks`` and added to
    ``default_hooks``, whose dict the Runner merges with its own defaults
    (to ``custom_hooks`` when ``key`` holds another hook). ``default_hooks[key]
    = None`` (e.g. ``--cfg-options default_hooks.rng_state=None``) turns it off:
    the key is dropped, as the Runner drops its own default hooks set to None
    (it refuses None under other keys).
    """
    default_hooks = cfg.get('default_hooks') or {}
    if key in default_hooks and default_hooks[key] is None:
        cfg.default_hooks = {k: v for k, v in default_hooks.items() if k != key}
        return
    hooks = [*default_hooks.values(), *(cfg.get('custom_hooks') or [])]
    if any(isinstance(hook, dict) and type_name(hook.get('type', '')) == hook_type
           for hook in hooks):
        return
    if key not in default_hooks:
        cfg.default_hooks = {**default_hooks, key: dict(type=hook_type)}
    else:  # the key holds another hook: keep it
        cfg.custom_hooks = [*(cfg.get('custom_hooks') or []), dict(type=hook_type)]


def add_check_hook(cfg: Config) -> None:
    """Give the config ``ExpandNetCheckHook`` when it does not carry one.

    ExpandNet configs carry the hook (``default_hooks.expand_check``), so its
    checks fire under mmdet's and mmseg's own ``tools/train.py`` too; here
    every config gets them (a stock compact config's ``load_from`` is checked
    as well).
    """
    _add_hook(cfg, 'expand_check', 'ExpandNetCheckHook')


def add_resume_hooks(cfg: Config) -> None:
    """Save kill-safe checkpoints that resume exactly, in every config.

    The stock ``CheckpointHook`` (the config's, or the Runner's default one
    saving every epoch) becomes ``SafeCheckpointHook`` with the same
    arguments; ``RNGStateHook`` is added when missing. ExpandNet configs
    select both themselves (``default_hooks.checkpoint.type``,
    ``default_hooks.rng_state``); a checkpoint hook of another type, or
    ``checkpoint=None``, is left as it is.
    """
    default_hooks = dict(cfg.get('default_hooks') or {})
    checkpoint = default_hooks.get('checkpoint', dict(type='CheckpointHook', interval=1))
    if isinstance(checkpoint, dict) and type_name(checkpoint.get('type', '')) == 'CheckpointHook':
        cfg.default_hooks = {**default_hooks,
                             'checkpoint': {**checkpoint, 'type': 'SafeCheckpointHook'}}
    _add_hook(cfg, 'rng_state', 'RNGStateHook')


def main() -> int:
    """Build the runner from the config and train."""
    args = parse_args()
    require_file(args.config, 'config')
    if args.resume not in (None, 'auto') and '://' not in args.resume:
        require_file(args.resume, '--resume checkpoint')
    cfg = build_cfg(args)
    check_datasets(cfg, ('train_dataloader', 'val_dataloader'))
    add_check_hook(cfg)
    add_resume_hooks(cfg)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
