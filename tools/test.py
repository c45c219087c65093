"""Evaluate a checkpoint with the stock MMEngine Runner, metrics and visualiser.

    python tools/test.py CONFIG CKPT [--work-dir DIR] [--out PATH] [--show]
                         [--show-dir DIR] [--wait-time S] [--tta] [--cfg-options ...]

CONFIG may be an ExpandNet config; CKPT may be its training checkpoint (the
expanded model is evaluated) or a compact checkpoint (``*_compact.pth``, or any
stock checkpoint of the compact model): then the compact model -- what is
deployed -- is built from the compact config inside the ExpandNet config and
evaluated directly.
"""
import argparse
import os
import os.path as osp
import sys

import expand_mm  # noqa: F401  (registers ExpandNet, the hooks, torch.load fix)
from expand_mm.checkpoint import check_plain_model_checkpoint, read_checkpoint, strip_prefix
from expand_mm.cli import UsageError, require_file, run_tool
from expand_mm.compat import type_name
from expand_mm.datasets_check import check_datasets
from expand_mm.models import deployable_model_cfg
from expand_mm.planting import refuse_unfinished_planting
from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, RUNNERS, DefaultScope
from mmengine.runner import Runner


def parse_args() -> argparse.Namespace:
    """Command-line arguments (mmdet / mmseg conventions)."""
    parser = argparse.ArgumentParser(description='Test (and evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='training or compact checkpoint')
    parser.add_argument('--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument('--out', help='also dump the predictions: a .pkl file for mmdet '
                        '(DumpDetResults), a directory of prediction images for mmseg')
    parser.add_argument('--show', action='store_true',
                        help='show the painted predictions in a window (needs a display)')
    parser.add_argument('--show-dir', help='directory where painted images are saved (mmdet: '
                        'under WORK_DIR/TIMESTAMP/ when relative, as its test.py does)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each image is shown with --show')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation with the "
                        "config's tta_model and tta_pipeline (of the model tested: the "
                        'compact one for a compact checkpoint)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def is_compact_checkpoint(cfg: Config, state_dict: dict) -> bool:
    """Whether ``state_dict`` matches the compact model of ``cfg`` key for key."""
    compact_cfg = deployable_model_cfg(cfg.model)
    if compact_cfg is cfg.model:
        return False
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        compact = MODELS.build(compact_cfg)
    expected = compact.state_dict()
    state_dict = strip_prefix(state_dict)
    return set(expected) == set(state_dict) and all(
        tuple(expected[k].shape) == tuple(v.shape) for k, v in state_dict.items())


def check_plain_checkpoint(cfg: Config, state_dict: dict, path: str) -> None:
    """Refuse a checkpoint that does not fit a stock (not ExpandNet) config's model.

    MMEngine loads checkpoints non-strictly and only logs the mismatch, so an
    ExpandNet training checkpoint given with the compact config would be scored
    as an untrained model (:func:`~expand_mm.checkpoint.check_plain_model_checkpoint`).
    Keys the model lacks (an auxiliary head dropped for testing) are only reported.

    Raises:
        CheckpointError: Naming the keys, if some of the model's weights are
            missing from ``state_dict`` or have another shape.
    """
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        model = MODELS.build(cfg.model)
    mismatch = check_plain_model_checkpoint(model, state_dict, path)
    if mismatch.unexpected:
        print(f'warning: {path} has {len(mismatch.unexpected)} entries that this model does '
              f'not use, ignored: {", ".join(mismatch.unexpected[:6])}')


def enable_visualisation(cfg: Config, show_dir: str | None, show: bool = False,
                         wait_time: float = 2) -> None:
    """Ask the stock visualisation hook to draw predictions, as mmdet's / mmseg's test.py do.

    Args:
        cfg: The test config, edited in place.
        show_dir: Where painted images are written (``None``: not written).
        show: Also show each one in a window, for ``wait_time`` seconds.
        wait_time: Seconds per image with ``show``.

    Raises:
        UsageError: If the config has no ``default_hooks.visualization``.
    """
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise UsageError('--show / --show-dir need default_hooks.visualization in the config '
                         "(mmdet: dict(type='DetVisualizationHook'), mmseg: "
                         "dict(type='SegVisualizationHook'))")
    hook['draw'] = True
    # The stock configs name their visualizer 'visualizer', and a visualizer is a named
    # singleton: a runner built earlier in this process (main() called again) would lend
    # its own, with its class and save_dir. Unnamed, the runner names it after its run.
    if isinstance(cfg.get('visualizer'), dict):
        cfg.visualizer.pop('name', None)
    if show:
        hook['show'] = True
        hook['wait_time'] = wait_time
    if show_dir:
        if type_name(hook['type']) == 'DetVisualizationHook':
            hook['test_out_dir'] = show_dir
        else:  # mmseg's SegVisualizationHook draws through the visualizer's save_dir
            cfg.visualizer['save_dir'] = show_dir


def enable_tta(cfg: Config) -> None:
    """Wrap the model to test in the config's ``tta_model``, data in ``tta_pipeline``.

    As mmdet's / mmseg's ``tools/test.py --tta`` do; here it wraps the model
    that is tested (the compact one for a compact checkpoint).

    Raises:
        UsageError: If the config has no ``tta_model`` or no ``tta_pipeline``.
    """
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise UsageError(f'--tta needs {" and ".join(missing)} in the config (mmseg\'s stock '
                         'dataset configs define both; for mmdet, see its configs\' *_tta.py '
                         'files)')
    cfg.model = dict(cfg.tta_model, module=cfg.model)
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    if 'batch_shapes_cfg' in dataset:  # YOLO-style batch shapes do not apply to TTA views
        dataset['batch_shapes_cfg'] = None
    dataset['pipeline'] = cfg.tta_pipeline


def dump_predictions(cfg: Config, out: str) -> None:
    """Add the stock prediction dump of the task to the test evaluator (``--out``)."""
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) \
        else [cfg.test_evaluator]
    if cfg.get('default_scope') == 'mmdet':
        if not out.endswith(('.pkl', '.pickle')):
            raise UsageError(f'--out {out!r}: mmdet dumps predictions to a .pkl or .pickle file')
        cfg.test_evaluator = [*evaluators, dict(type='DumpDetResults', out_file_path=out)]
    else:  # mmseg's IoUMetric writes the predicted label maps into output_dir
        iou_metrics = [e for e in evaluators if type_name(e.get('type', '')) == 'IoUMetric']
        if not iou_metrics:
            raise UsageError(f'--out {out!r}: mmseg writes label maps through an IoUMetric in '
                             'test_evaluator, and this config has none (types: '
                             f'{[e.get("type") for e in evaluators]})')
        for metric in iou_metrics:
            metric['output_dir'] = out
            metric['keep_results'] = True


def main() -> int:
    """Build the runner for the right (compact or expanded) model and test."""
    args = parse_args()
    require_file(args.config, 'config')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])
    checkpoint = read_checkpoint(args.checkpoint)
    refuse_unfinished_planting(checkpoint.get('meta') or {}, args.checkpoint, 'Test')
    if deployable_model_cfg(cfg.model) is cfg.model:
        check_plain_checkpoint(cfg, checkpoint['state_dict'], args.checkpoint)
    elif is_compact_checkpoint(cfg, checkpoint['state_dict']):
        print(f'{args.checkpoint} is a compact checkpoint: evaluating the compact model')
        cfg.model = deployable_model_cfg(cfg.model)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualisation(cfg, args.show_dir, args.show, args.wait_time)
    if args.out:
        dump_predictions(cfg, args.out)
    if args.tta:
        enable_tta(cfg)
    check_datasets(cfg, ('test_dataloader',))
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.test()
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
