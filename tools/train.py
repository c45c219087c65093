"""Train a (compact or ExpandNet) mmdet / mmseg config with the stock MMEngine Runner.

Same shape and flags as mmdet's / mmseg's ``tools/train.py``::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch]
"""
import argparse
import os
import os.path as osp
import sys

import expand_mm  # noqa: F401  (registers ExpandNet, the hooks, torch.load fix)
from expand_mm.checkpoint import (CheckpointError, check_plain_model_checkpoint,
                                  compare_state_dict, expanded_chain_paths, expanded_key_shapes,
                                  read_checkpoint, strip_prefix, wrapper_checkpoint_hint)
from expand_mm.cli import UsageError, require_file, run_tool
from expand_mm.compat import type_name
from expand_mm.datasets_check import check_datasets
from expand_mm.deploy import find_deployable, unwrap_model
from expand_mm.optim.factor_lr import ADAPTIVE_OPTIMIZERS
from expand_mm.surgery import expanded_layers
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint


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


def check_load_from(runner: Runner) -> None:
    """Refuse a ``load_from`` / ``--resume`` checkpoint that a plain model would half-load.

    For a stock (not ExpandNet, not wrapper) model MMEngine loads non-strictly
    and only logs the mismatch. A resume (``--resume CKPT``, or the latest
    checkpoint of the work dir for ``--resume`` alone) must fit exactly (missing or
    wrong-shaped weights are refused, naming them); ``load_from`` may be partial
    (fine-tuning from a model with another head), but not an ExpandNet
    training checkpoint of this model, whose expanded layers would stay random,
    nor one that gives the model no weight at all (a training-time wrapper's
    checkpoint, whose keys carry a prefix, or another model's).
    ExpandNet and wrapper configs are checked by ``ExpandCheckpointLoadHook``.

    Raises:
        CheckpointError: Naming the checkpoint, the keys and what to use.
    """
    path = runner._load_from
    if path is None and runner._resume:  # --resume auto: what mmengine will pick
        path = find_latest_checkpoint(runner.work_dir)
    if not isinstance(path, str) or '://' in path:
        return
    model = unwrap_model(runner.model)
    deployable, prefix = find_deployable(model)
    if prefix or expanded_layers(deployable):
        return
    state_dict = read_checkpoint(path, mmap=True)['state_dict']
    if runner._resume:
        check_plain_model_checkpoint(model, state_dict, path)
        return
    wrapper = wrapper_checkpoint_hint(expanded_key_shapes(model), state_dict)
    if wrapper:
        raise CheckpointError(f'load_from={path!r} would load nothing: {wrapper}')
    fitting = compare_state_dict(model, state_dict)
    if len(fitting.missing) + len(fitting.wrong_shape) == len(model.state_dict()):
        part = submodule_of_checkpoint(model, state_dict)
        if part:
            raise CheckpointError(
                f'load_from={path!r} holds the weights of this model\'s {part!r} without the '
                f'{part + "."!r} prefix (e.g. {sorted(strip_prefix(state_dict))[0]!r}), so it '
                f'would load nothing: give it to that part as its init_cfg=dict(type='
                f"'Pretrained', checkpoint={path!r}) (e.g. --cfg-options model.{part}.init_cfg"
                f'.type=Pretrained model.{part}.init_cfg.checkpoint={path}), or save it with '
                'the prefix')
        raise CheckpointError(
            f'load_from={path!r} has none of the {len(model.state_dict())} weights of this '
            f'{type(model).__name__} (with their shapes; it holds e.g. '
            f'{sorted(strip_prefix(state_dict))[:3]}): it is a checkpoint of another model. '
            'Use a checkpoint of this config, or of a model sharing its backbone')
    chains = expanded_chain_paths(model, state_dict)
    if chains:
        raise CheckpointError(
            f'load_from={path!r} is an ExpandNet training checkpoint of this model ('
            f'{len(chains)} layers, e.g. {chains[0]!r}, are expanded chains), which would '
            'leave them at their initialisation: load its *_compact.pth (or python '
            'tools/contract.py EXPANDNET_CONFIG CKPT OUT), or train with the ExpandNet config')


def submodule_of_checkpoint(model, state_dict: dict) -> str | None:
    """The top-level part of ``model`` (``'backbone'``) whose weights ``state_dict`` holds
    without their prefix (an ImageNet-pretrained backbone file), or None."""
    keys = {k: v.shape for k, v in model.state_dict().items()}
    state_dict = strip_prefix(state_dict)
    for name, _ in model.named_children():
        found = sum(keys.get(f'{name}.{k}') == getattr(v, 'shape', None)
                    for k, v in state_dict.items())
        if found and 2 * found >= len(state_dict):
            return name
    return None


def expandnet_setup_warnings(cfg: Config, runner: Runner) -> list[str]:
    """What an ExpandNet config leaves out that its training would want.

    An adaptive optimizer (Adam, AdamW, ...) without
    ``ExpandNetOptimWrapperConstructor`` trains the factors at the base rate,
    which moves the composed kernels far more than the compact ones move
    (README: the digits detector fell from mAP 31.8 to 9.3); without
    ``ContractCheckpointHook`` no compact checkpoint is written.
    """
    model = unwrap_model(runner.model)
    deployable, _ = find_deployable(model)
    trained = [path for path, layer in expanded_layers(deployable)
               if any(p.requires_grad for p in layer.parameters())]
    if not trained:
        return []
    warnings = []
    optim_cfg = cfg.get('optim_wrapper') or {}
    optimizer = type_name((optim_cfg.get('optimizer') or {}).get('type', ''))
    constructor = type_name(optim_cfg.get('constructor', ''))
    if optimizer in ADAPTIVE_OPTIMIZERS and constructor != 'ExpandNetOptimWrapperConstructor':
        warnings.append(
            f"{len(trained)} expanded layer{'s' * (len(trained) != 1)} train"
            f"{'s' * (len(trained) == 1)} with {optimizer} at the base rate: set "
            "optim_wrapper.constructor='ExpandNetOptimWrapperConstructor' (per-factor rates; "
            'without them the expanded layers move far faster than compact ones, see README)')
    if not any(type(hook).__name__ == 'ContractCheckpointHook' for hook in runner.hooks):
        warnings.append(
            "no ContractCheckpointHook in custom_hooks: checkpoints are written in the "
            "training form only (add dict(type='ContractCheckpointHook') for a stock "
            "*_compact.pth beside each, or run tools/contract.py later)")
    return warnings


def main() -> int:
    """Build the runner from the config and train."""
    args = parse_args()
    require_file(args.config, 'config')
    if args.resume not in (None, 'auto') and '://' not in args.resume:
        require_file(args.resume, '--resume checkpoint')
    cfg = build_cfg(args)
    check_datasets(cfg, ('train_dataloader', 'val_dataloader'))
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    check_load_from(runner)
    for warning in expandnet_setup_warnings(cfg, runner):
        runner.logger.warning(warning)
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
