"""The main demo: a compact model against its ExpandNet-CL (r=4), trained, contracted, evaluated.

    python tools/demo.py [--quick] [--work-dir work_dirs/demo] [--task det|seg|both]
                         [--seed 0] [--data-root data]

For each task -- digit detection (the compact YOLO-LITE-style detector, COCO
mAP) and digit segmentation (the compact U-Net, mIoU) -- the demo

1. generates the digits data set if it is missing (``tools/make_digits_data.py``);
2. trains the compact model and its ExpandNet-CL r=4 (online mode) with the same
   seed, data and schedule through the stock MMEngine ``Runner``;
3. takes the ExpandNet's compact checkpoint (``iter_N_compact.pth``, written by
   ``ContractCheckpointHook``) and evaluates it with the *compact* config, exactly
   like the baseline's ``iter_N.pth``: the deployed model, stock metric;
4. measures parameters and MACs of both deployed models (identical by
   construction; checked), the training-form parameters of the ExpandNet, the
   train time per iteration and the inference time per image;

and writes ``report.md``, ``report.json``, ``report.png`` (loss curves, metric
bars) and side-by-side prediction images into the work dir. ``--quick`` runs the
same path on a tiny data set for a few iterations (a smoke test; its numbers
mean nothing).
"""
from __future__ import annotations

import os

# libgomp spin-waits by default: on a machine whose cores are shared with other
# jobs, every multi-threaded op then waits for a descheduled spinning thread
# (measured here: a 2-thread train step 40x slower than a 1-thread one at load
# 3). Passive waiting removes that. OpenMP reads it once, before torch loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os.path as osp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'digits')

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # headless: the demo only writes files

import numpy as np  # noqa: E402
import torch  # noqa: E402

import expand_mm  # noqa: E402,F401  (registers ExpandNet, YOLOLite, the hooks)
from expand_mm.cli import run_tool  # noqa: E402
from expand_mm.deploy import compact_checkpoint_path, count_macs  # noqa: E402
from expand_mm.models import deployable_model  # noqa: E402
from expand_mm.surgery import count_params, expanded_layers  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


@dataclass(frozen=True)
class TaskSpec:
    """One task of the demo: a compact config, its ExpandNet config and the metric.

    Attributes:
        name: ``'det'`` or ``'seg'``.
        title: Human-readable task name.
        compact_config: Path of the compact model's config.
        expandnet_config: Path of its ExpandNet-CL r=4 config.
        metric_key: Key of the headline metric in ``Runner.test()``'s result.
        metric_name: Short name of the metric for tables.
        metric_scale: Factor that turns the metric into percent.
        extra_keys: Further metrics reported (key -> name), same scale.
    """

    name: str
    title: str
    compact_config: str
    expandnet_config: str
    metric_key: str
    metric_name: str
    metric_scale: float
    extra_keys: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    'det': TaskSpec(
        name='det', title='digit detection (YOLO-LITE-style detector)',
        compact_config=osp.join(CONFIG_DIR, 'yolo-lite_1xb16-900i_digits-det-64x64.py'),
        expandnet_config=osp.join(
            CONFIG_DIR, 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'),
        metric_key='coco/bbox_mAP', metric_name='mAP', metric_scale=100.0,
        extra_keys={'coco/bbox_mAP_50': 'mAP50'}),
    'seg': TaskSpec(
        name='seg', title='digit segmentation (U-Net S4-D16, 16 channels)',
        compact_config=osp.join(CONFIG_DIR,
                                'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'),
        expandnet_config=osp.join(
            CONFIG_DIR, 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'),
        metric_key='mIoU', metric_name='mIoU', metric_scale=1.0,
        extra_keys={'aAcc': 'aAcc'}),
}
VARIANTS = ('compact', 'expandnet')
# Progress steps per task: train both variants, evaluate both, time and draw.
STEPS_PER_TASK = 2 * len(VARIANTS) + 1
VARIANT_TITLES = {'compact': 'compact', 'expandnet': 'ExpandNet-CL r=4 → contracted'}

# The demo's data: 64x64 canvases with 16-32 px digits (the configs in
# configs/digits/ expect it under data/digits64). Large digits on small
# canvases are what lets a compact model learn to tell digits apart within a
# few CPU minutes; see the calibration runs in the README.
DEMO_DATA = dict(num_train=2000, num_val=500, img_size=64, min_digits=1, max_digits=4,
                 min_scale=16, max_scale=32)
# --quick: a smoke test of the whole path. Tiny data, a few iterations, small
# batches and no loader workers (their start-up would dominate).
QUICK_DATA = dict(DEMO_DATA, num_train=24, num_val=8)
QUICK_ITERS = 6
QUICK_BATCH = 4
# Inference time: images timed per model (interleaved rounds, median).
TIMING_IMAGES = 20
TIMING_IMAGES_QUICK = 4
PREDICTION_IMAGES = 4
DET_SCORE_THR = 0.3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The parsed namespace.
    """
    parser = argparse.ArgumentParser(
        description='Compact model vs its ExpandNet-CL r=4 on the digits sets: train, '
        'contract, evaluate, report.')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data, a few iterations: checks the whole path in about '
                        'two minutes; the numbers mean nothing')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='where runs, checkpoints and the report go')
    parser.add_argument('--task', choices=['det', 'seg', 'both'], default='both')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of both trainings (weights init, data order)')
    parser.add_argument('--jobs', default='auto',
                        help="tasks trained at once: 'auto' (both tasks side by side, one "
                        'process and half the cores each, on a CPU machine with >= 2 usable '
                        'cores; one after the other on CUDA or a single core), 1 or 2')
    parser.add_argument('--data-root', default='data/digits64',
                        help='root of digits_det/ and digits_seg/ (generated if missing or '
                        'made with other settings); --quick uses DATA_ROOT/quick/ so that '
                        'the full sets stay intact')
    return parser.parse_args(argv)


def usable_cpus() -> int:
    """CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return cpus or 1


def resolve_jobs(jobs: str, num_tasks: int) -> int:
    """How many tasks train at once (``--jobs``).

    Two tasks side by side, each in its own process with its share of the
    cores, beat one process using all of them: on this project's 2-vCPU
    machine a second intra-op thread made an ExpandNet step only 1.1x faster
    (seg: 0.38 -> 0.34 s), while two 1-thread trainings side by side each ran
    only 1.1-1.35x slower than one training alone with both threads (compact
    seg 0.21 vs 0.19 s, ExpandNet det 0.55 vs 0.41 s): 1.5-1.8x the
    throughput. On CUDA one device is shared, so
    the tasks run one after the other.

    Args:
        jobs: ``'auto'`` or a positive integer as text.
        num_tasks: Tasks the demo runs.

    Returns:
        The number of worker processes (1 = in this process).
    """
    if jobs == 'auto':
        if torch.cuda.is_available() or usable_cpus() < 2:
            return 1
        return min(num_tasks, 2)
    if not jobs.isdigit() or int(jobs) < 1:
        raise SystemExit(f"--jobs must be 'auto' or a positive integer, got {jobs!r}")
    return min(int(jobs), num_tasks)


def configure_threads(jobs: int = 1) -> tuple[int, str]:
    """Sets torch's intra-op threads for CPU training.

    Measured on a 2-core machine (one train step of the digits U-Net
    ExpandNet): 2 threads were 1.4x faster than 1 while the machine was
    otherwise idle, and slower than 1 once other jobs kept the cores busy.
    So: all usable cores when the 1-minute load average says they are free,
    one core fewer otherwise (left to the data loader worker and the other
    jobs); with ``jobs`` tasks side by side, an equal share each.
    ``OMP_NUM_THREADS`` set by the user, or a CUDA device, leaves torch's
    default alone.

    Args:
        jobs: Training processes running at once.

    Returns:
        ``(threads, why)``.
    """
    if torch.cuda.is_available():
        return torch.get_num_threads(), 'CUDA device: torch default'
    if 'OMP_NUM_THREADS' in os.environ:
        return torch.get_num_threads(), 'OMP_NUM_THREADS set by the user'
    cpus = usable_cpus()
    if jobs > 1:
        threads = max(1, cpus // jobs)
        torch.set_num_threads(threads)
        return threads, f'{jobs} tasks side by side on {cpus} cores: {threads} each'
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float(cpus)
    if load < 1.0:
        threads, why = cpus, f'load average {load:.2f} < 1: all {cpus} cores'
    else:
        threads = max(1, cpus - 1)
        why = f'load average {load:.2f} >= 1 (shared machine): {threads} of {cpus} cores'
    torch.set_num_threads(threads)
    return threads, why


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def load_data_tool():
    """Imports ``tools/make_digits_data.py`` (``tools/`` is not a package).

    Returns:
        The module.
    """
    name = 'make_digits_data'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO_ROOT, 'tools', 'make_digits_data.py'))
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that its dataclasses and worker pool can
    # resolve the module by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def data_settings(data_root: str, quick: bool) -> tuple[str, Any]:
    """Where the demo's data sets go and the generator settings that make them.

    Args:
        data_root: The ``--data-root`` argument.
        quick: The tiny smoke-test sets.

    Returns:
        ``(out, settings)``: the generator's output root and its ``GenSettings``.
    """
    mdd = load_data_tool()
    if quick:
        return osp.join(data_root, 'quick'), mdd.GenSettings(**QUICK_DATA)
    return data_root, mdd.GenSettings(**DEMO_DATA)


def data_command(out: str, settings: Any) -> str:
    """The ``tools/make_digits_data.py`` command that writes the same data."""
    return (f'python tools/make_digits_data.py --out {shlex.quote(out)} --img-size '
            f'{settings.img_size} --min-scale {settings.min_scale} --max-scale '
            f'{settings.max_scale} --max-digits {settings.max_digits} --num-train '
            f'{settings.num_train} --num-val {settings.num_val}')


def ensure_data(data_root: str, tasks: Sequence[str], quick: bool,
                logger: MMLogger) -> dict[str, Any]:
    """Generates the digits data sets that are missing or out of date.

    The demo's settings are :data:`DEMO_DATA` (2,000 train / 500 val canvases
    of 64x64); ``quick`` uses a tiny set under ``data_root/quick``. The data
    seed stays the generator's default whatever the demo's (training) seed is:
    the data set is fixed.

    Args:
        data_root: Root holding ``digits_det/`` and ``digits_seg/``.
        tasks: ``'det'`` and / or ``'seg'``.
        quick: Use the tiny set.
        logger: Where progress goes.

    Returns:
        ``out`` (generator output root), ``roots`` (task -> dataset root),
        ``settings``, ``up_to_date`` (nothing had to be generated), ``seconds``
        and ``command`` (the ``tools/make_digits_data.py`` equivalent).
    """
    mdd = load_data_tool()
    out, settings = data_settings(data_root, quick)
    start = time.perf_counter()
    roots, generated = {}, False
    for task in tasks:
        root = str(mdd.task_root(out, task))
        if mdd.is_up_to_date(out, task, settings):
            logger.info(f'data: {root} is up to date')
        else:
            logger.info(f'data: generating {root} ({settings.num_train} train / '
                        f'{settings.num_val} val canvases of {settings.img_size}x'
                        f'{settings.img_size}; about 20 s per task at full size)')
            mdd.generate(out, task, settings, progress=logger.info)
            generated = True
        roots[task] = root
    return dict(out=out, roots=roots, settings=settings, up_to_date=not generated,
                seconds=time.perf_counter() - start, command=data_command(out, settings))


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
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
        # when the config was parsed (see configs/_base_/datasets/digits_det.py).
        overrides.update({f'{evaluator}.ann_file': root + 'annotations/instances_val.json'
                          for evaluator in ('val_evaluator', 'test_evaluator')})
    return overrides


def _scale_schedule(cfg: Config, max_iters: int) -> None:
    """Shrink the iteration-based schedule of ``cfg`` to ``max_iters``, proportionally."""
    old = cfg.train_cfg.max_iters
    factor = max_iters / old
    for sched in cfg.param_scheduler:
        for key in ('begin', 'end', 'T_max'):
            if key in sched:
                sched[key] = max(1, int(round(sched[key] * factor))) if sched[key] else 0
    cfg.train_cfg.max_iters = max_iters
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


# ----------------------------------------------------------------------------
# Training, evaluation, measurements
# ----------------------------------------------------------------------------
def read_scalars(log_dir: str) -> list[dict]:
    """The training records of a run's ``vis_data/scalars.json`` (one dict per log line).

    Args:
        log_dir: The runner's ``log_dir``.

    Returns:
        Records that carry a ``loss``, in order.
    """
    path = osp.join(log_dir, 'vis_data', 'scalars.json')
    records = []
    if osp.isfile(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if 'loss' in record and 'iter' in record:
                    records.append(record)
    return records


def train_run(cfg: Config, logger: MMLogger) -> dict[str, Any]:
    """Trains one config with ``Runner.from_cfg`` and collects what the report needs.

    Args:
        cfg: A config from :func:`demo_cfg` (``train=True``).
        logger: The demo's logger.

    Returns:
        ``checkpoint`` (last ``iter_N.pth``), ``compact_checkpoint`` (its
        ``_compact`` twin for an ExpandNet), ``training_params`` (parameters of
        the model as trained), ``scalars`` (loss records), ``time_per_iter``
        (median of the logged iteration times, seconds), ``train_wall``
        (seconds of ``runner.train()``), ``cpu_per_iter`` (CPU seconds of this
        process per iteration, checkpointing included), ``iters`` and
        ``log_dir``.
    """
    runner = Runner.from_cfg(cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    runner.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model = deployable_model(runner.model)
    last = runner.message_hub.get_info('last_ckpt')
    result = dict(
        checkpoint=last,
        compact_checkpoint=None,
        training_params=count_params(model),
        expanded_layers=len(expanded_layers(model)),
        scalars=read_scalars(runner.log_dir),
        train_wall=wall,
        # CPU seconds of this process per iteration: on a machine shared with
        # other jobs, what one iteration costs when it has its cores to itself
        # (with one compute thread), whatever the load.
        cpu_per_iter=cpu / cfg.train_cfg.max_iters,
        iters=cfg.train_cfg.max_iters,
        log_dir=runner.log_dir,
        device=str(next(model.parameters()).device))
    if result['expanded_layers']:
        result['compact_checkpoint'] = compact_checkpoint_path(last)
        if not osp.isfile(result['compact_checkpoint']):
            raise FileNotFoundError(
                f'ContractCheckpointHook wrote no {result["compact_checkpoint"]}; is it in '
                'custom_hooks of the ExpandNet config?')
    times = [r['time'] for r in result['scalars'] if 'time' in r]
    # The first window holds the start-up (first batches, allocator warm-up).
    steady = times[1:] or times
    result['time_per_iter'] = statistics.median(steady) if steady else wall / result['iters']
    logger.info(f'trained in {wall:.1f} s ({result["iters"]} iterations, median '
                f'{result["time_per_iter"]:.3f} s/iter); checkpoint {last}')
    del runner, model
    gc.collect()
    return result


def evaluate(cfg: Config, checkpoint: str) -> tuple[dict[str, float], torch.nn.Module, Any]:
    """Evaluates a compact checkpoint with the compact config's test loop and metric.

    The checkpoint is loaded with ``strict=True``: a deployed checkpoint must
    fit the stock compact model key for key.

    Args:
        cfg: The compact config from :func:`demo_cfg` (``train=False``).
        checkpoint: A compact checkpoint (``iter_N.pth`` of the compact run or
            ``iter_N_compact.pth`` of the ExpandNet run).

    Returns:
        ``(metrics, model, dataset)``: the test metrics, the loaded model (eval
        mode) and the test dataset, for timing and drawing.
    """
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(checkpoint, map_location='cpu', strict=True)
    metrics = runner.test()
    model = deployable_model(runner.model).eval()
    dataset = runner.test_dataloader.dataset
    del runner
    gc.collect()
    return {k: float(v) for k, v in metrics.items()}, model, dataset


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_inference(models: dict[str, torch.nn.Module], dataset, num_images: int
                   ) -> tuple[dict[str, float], dict[str, list]]:
    """Inference time per image (``test_step``: preprocessing, network, postprocessing).

    The models run interleaved on the same images, one image per call, after
    one warm-up round, so a busy phase of a shared machine hits all alike.

    Args:
        models: Name -> model in eval mode.
        dataset: Test dataset (its items are packed inputs).
        num_images: Images timed per model.

    Returns:
        ``(median seconds per image by name, predictions by name)`` where the
        predictions are the data samples of the first :data:`PREDICTION_IMAGES`.
    """
    n = min(num_images, len(dataset))
    batches = [pseudo_collate([dataset[i]]) for i in range(n)]
    times: dict[str, list[float]] = {k: [] for k in models}
    preds: dict[str, list] = {k: [] for k in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            model.test_step(batches[0])
        for i, batch in enumerate(batches):
            for name, model in models.items():
                device = next(model.parameters()).device
                _sync(device)
                start = time.perf_counter()
                out = model.test_step(batch)
                _sync(device)
                times[name].append(time.perf_counter() - start)
                if i < PREDICTION_IMAGES:
                    preds[name].append(out[0].cpu())
    return {k: statistics.median(v) for k, v in times.items()}, preds


def input_size(cfg: Config, task: str) -> tuple[int, int]:
    """The network input size ``(H, W)`` of a digits config."""
    if task == 'det':
        w, h = cfg.img_scale
        return h, w
    return tuple(cfg.crop_size)


def run_task(spec: TaskSpec, args: argparse.Namespace, data_root: str, logger: MMLogger,
             step: list[int], total_steps: int) -> dict[str, Any]:
    """Trains, contracts, evaluates and measures both models of one task.

    Args:
        spec: The task.
        args: Command-line arguments.
        data_root: The task's dataset root.
        logger: The demo's logger.
        step: One-element counter of the demo's steps (advanced here).
        total_steps: Number of steps of the whole demo, for the progress lines.

    Returns:
        Everything the report shows for this task.
    """
    task_dir = osp.join(args.work_dir, spec.name)
    result: dict[str, Any] = dict(task=spec.name, title=spec.title, runs={}, commands=[])
    configs = dict(compact=spec.compact_config, expandnet=spec.expandnet_config)

    def progress(what: str) -> None:
        step[0] += 1
        logger.info(f'[{step[0]}/{total_steps}] {spec.name}: {what}')

    for variant in VARIANTS:
        progress(f'training the {VARIANT_TITLES[variant].split(" →")[0]} model '
                 f'({osp.basename(configs[variant])})')
        run_dir = osp.join(task_dir, variant)
        cfg = demo_cfg(configs[variant], spec.name, data_root, run_dir, args.seed, args.quick,
                       f'demo_{spec.name}_{variant}_train', train=True)
        run = train_run(cfg, logger)
        run['deployed_checkpoint'] = (run['compact_checkpoint'] if variant == 'expandnet'
                                      else run['checkpoint'])
        run['config'] = osp.relpath(configs[variant], REPO_ROOT)
        run['batch_size'] = cfg.train_dataloader.batch_size
        run['optimizer'] = dict(cfg.optim_wrapper.optimizer)
        run['optim_constructor'] = cfg.optim_wrapper.get('constructor')
        run['paramwise_cfg'] = dict(cfg.optim_wrapper.get('paramwise_cfg') or {})
        result['runs'][variant] = run
        result['commands'].append(train_command(spec, variant, run_dir, args.seed, data_root))

    models, dataset = {}, None
    for variant in VARIANTS:
        run = result['runs'][variant]
        progress(f'evaluating the deployed {VARIANT_TITLES[variant]} checkpoint with the '
                 f'compact config ({osp.basename(run["deployed_checkpoint"])})')
        eval_dir = osp.join(task_dir, variant, 'test')
        cfg = demo_cfg(spec.compact_config, spec.name, data_root, eval_dir, args.seed,
                       args.quick, f'demo_{spec.name}_{variant}_test', train=False)
        metrics, model, dataset = evaluate(cfg, run['deployed_checkpoint'])
        run['metrics'] = metrics
        if spec.metric_key not in metrics:
            # mmdet's CocoMetric returns nothing when no box passes the score
            # threshold (an untrained model): that is a score of 0.
            logger.warning(f'{spec.name} {variant}: no {spec.metric_key} in {metrics} (no '
                           'prediction above the score threshold); counted as 0')
        run['metric'] = metrics.get(spec.metric_key, 0.0) * spec.metric_scale
        run['extra_metrics'] = {name: metrics[key] * spec.metric_scale
                                for key, name in spec.extra_keys.items() if key in metrics}
        size = input_size(cfg, spec.name)
        run['deployed_params'] = count_params(model)
        run['deployed_macs'] = count_macs(model, size)
        run['input_size'] = size
        models[variant] = model
        result['commands'].append(
            test_command(spec, run['deployed_checkpoint'], eval_dir, data_root))
        logger.info(f'{spec.name} {VARIANT_TITLES[variant]}: {spec.metric_name} '
                    f'{run["metric"]:.2f}')

    progress('timing inference of both deployed models and drawing predictions')
    per_image, preds = time_inference(
        models, dataset, TIMING_IMAGES_QUICK if args.quick else TIMING_IMAGES)
    for variant in VARIANTS:
        result['runs'][variant]['infer_time'] = per_image[variant]
    compact, expandnet = (result['runs'][v] for v in VARIANTS)
    if (compact['deployed_params'], compact['deployed_macs']) != (
            expandnet['deployed_params'], expandnet['deployed_macs']):
        raise RuntimeError(
            f'{spec.name}: the deployed models differ (params {compact["deployed_params"]} vs '
            f'{expandnet["deployed_params"]}, MACs {compact["deployed_macs"]} vs '
            f'{expandnet["deployed_macs"]}); the contracted ExpandNet must be the compact model')
    result['gain'] = expandnet['metric'] - compact['metric']
    result['metric_name'] = spec.metric_name
    result['predictions'] = draw_predictions(spec, dataset, preds, args.work_dir)
    del models
    gc.collect()
    return result


def run_task_worker(task: str, args: argparse.Namespace, data_root: str,
                    jobs: int) -> dict[str, Any]:
    """:func:`run_task` in a worker process (``--jobs 2``): own threads and logger.

    Args:
        task: ``'det'`` or ``'seg'``.
        args: The demo's arguments.
        data_root: The task's dataset root (already generated).
        jobs: Worker processes running at once (sets the threads of this one).

    Returns:
        What :func:`run_task` returns.
    """
    configure_threads(jobs)
    logger = MMLogger.get_instance(f'expand_mm_demo_{task}', logger_name=f'demo[{task}]',
                                   log_file=osp.join(args.work_dir, f'demo_{task}.log'))
    return run_task(TASKS[task], args, data_root, logger, [0], STEPS_PER_TASK)


def run_tasks(tasks: Sequence[str], args: argparse.Namespace, roots: dict[str, str],
              logger: MMLogger, jobs: int) -> list[dict[str, Any]]:
    """Runs every task, side by side in ``jobs`` worker processes or here.

    Worker processes are spawned (not forked: the parent holds torch's thread
    pools and MMEngine's global registries), each with its share of the cores.
    """
    if jobs == 1:
        step = [0]
        return [run_task(TASKS[t], args, roots[t], logger, step,
                         STEPS_PER_TASK * len(tasks))
                for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    logger.info(f'training {", ".join(tasks)} side by side in {jobs} processes '
                f'(logs also in demo_<task>.log)')
    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = [pool.submit(run_task_worker, t, args, roots[t], jobs) for t in tasks]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------
def _palette(dataset) -> list[tuple[float, float, float]]:
    return [tuple(c / 255 for c in rgb) for rgb in dataset.metainfo['palette']]


def draw_predictions(spec: TaskSpec, dataset, preds: dict[str, list], work_dir: str) -> str:
    """Draws ground truth and both models' predictions side by side.

    Args:
        spec: The task.
        dataset: Test dataset (image paths, ground truth, class names, palette).
        preds: Variant -> predicted data samples of the first images.
        work_dir: Where ``{task}_predictions.png`` goes.

    Returns:
        The image's path.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    n = len(preds['compact'])
    det = spec.name == 'det'
    # det: boxes drawn on the image; seg: the image, then the label maps.
    columns = ([] if det else ['image']) + ['ground truth'] + [VARIANT_TITLES[v]
                                                               for v in VARIANTS]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.6 * n + 0.5),
                             squeeze=False)
    classes = dataset.metainfo['classes']
    palette = _palette(dataset)
    lut = np.full((256, 3), 1.0)  # white: the ignored edge band (255)
    lut[:len(palette)] = palette
    for row in range(n):
        sample = preds['compact'][row]
        image = np.asarray(Image.open(sample.img_path).convert('RGB'))
        for col, title in enumerate(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            source = VARIANTS[col - len(columns) + 2] if col >= len(columns) - 2 else None
            if det:
                ax.imshow(image)
                if source is None:
                    info = dataset.get_data_info(row)
                    boxes = [(inst['bbox'], inst['bbox_label'], None)
                             for inst in info['instances']]
                else:
                    inst = preds[source][row].pred_instances
                    keep = inst.scores >= DET_SCORE_THR
                    boxes = list(zip(inst.bboxes[keep].tolist(), inst.labels[keep].tolist(),
                                     inst.scores[keep].tolist()))
                for (x1, y1, x2, y2), label, score in boxes:
                    colour = palette[label]
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=colour, linewidth=1.5))
                    text = classes[label] + ('' if score is None else f' {score:.2f}')
                    ax.text(x1, y1 - 1, text, color='black', fontsize=6,
                            bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, linewidth=0))
            elif title == 'image':
                ax.imshow(image)
            else:
                if source is None:
                    label_map = np.asarray(Image.open(sample.seg_map_path)).astype(np.int64)
                else:
                    label_map = preds[source][row].pred_sem_seg.data[0].numpy().astype(np.int64)
                ax.imshow(lut[label_map])
    if spec.name == 'det':
        note = f'predictions with score >= {DET_SCORE_THR}'
    else:
        note = 'label maps (black: background, white: ignored edge band)'
    fig.suptitle(f'{spec.title}: {note}', fontsize=10)
    fig.tight_layout()
    path = osp.join(work_dir, f'{spec.name}_predictions.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_report_figure(results: list[dict], path: str, quick: bool) -> None:
    """Training-loss curves of both models per task, and the metric bars.

    Args:
        results: Per-task results of :func:`run_task`.
        path: Output PNG.
        quick: Marks the figure as a smoke test.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)),
                             squeeze=False, gridspec_kw=dict(width_ratios=[2.2, 1]))
    colours = dict(compact='tab:blue', expandnet='tab:orange')
    for row, res in enumerate(results):
        ax = axes[row][0]
        for variant in VARIANTS:
            scalars = res['runs'][variant]['scalars']
            ax.plot([r['iter'] for r in scalars], [r['loss'] for r in scalars],
                    label=VARIANT_TITLES[variant].split(' →')[0], color=colours[variant])
        ax.set_yscale('log')
        ax.set_xlabel('iteration')
        ax.set_ylabel('training loss')
        ax.set_title(f'{res["title"]}: training loss')
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[row][1]
        values = [res['runs'][v]['metric'] for v in VARIANTS]
        bars = ax.bar(['compact', 'ExpandNet\n(contracted)'], values,
                      color=[colours[v] for v in VARIANTS])
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f'{value:.1f}', ha='center',
                    va='bottom')
        ax.set_ylabel(res['metric_name'])
        ax.set_ylim(0, max(100.0 if res['metric_name'] == 'mIoU' else 0.0,
                           max(values) * 1.15 + 1))
        ax.set_title(f'deployed models: {res["metric_name"]} (one seed)')
    if quick:
        fig.suptitle('--quick smoke test: tiny data, a few iterations -- numbers mean nothing',
                     color='tab:red')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Host, CPU, threads, accelerator and load average (for the report)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(
        python=platform.python_version(), platform=platform.platform(), cpu=cpu,
        cpu_count=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def load_average() -> str:
    """``os.getloadavg()`` as ``'a, b, c'`` (1, 5, 15 minutes), or ``'n/a'``."""
    try:
        return ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'n/a'


def _fmt_int(n: int) -> str:
    return f'{n:,d}'


def _fmt_macs(n: int) -> str:
    return f'{n / 1e6:.1f} M'


def summary_rows(results: list[dict]) -> list[list[str]]:
    """The summary table: one row per (task, model).

    Columns: task, model, metric, params (deployed), MACs (deployed, per image),
    training-form params, train s/iter (wall, and CPU seconds of the training
    process), inference ms/image.
    """
    rows = []
    for res in results:
        for variant in VARIANTS:
            run = res['runs'][variant]
            h, w = run['input_size']
            rows.append([
                res['task'], VARIANT_TITLES[variant],
                f'{res["metric_name"]} {run["metric"]:.2f}',
                _fmt_int(run['deployed_params']),
                f'{_fmt_macs(run["deployed_macs"])} @{h}x{w}',
                _fmt_int(run['training_params']),
                f'{run["time_per_iter"]:.3f} ({run["cpu_per_iter"]:.3f})',
                f'{1000 * run["infer_time"]:.1f}',
            ])
    return rows


SUMMARY_HEADER = ['task', 'model (deployed)', 'score', 'params', 'MACs',
                  'training-form params', 'train s/iter (CPU s)', 'infer ms/img']


def format_text_table(header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append('  '.join('-' * w for w in widths))
    lines += ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return '\n'.join(lines)


def format_markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def verdicts(results: list[dict], quick: bool) -> list[str]:
    """One sentence per task: what was measured, gain or not, and its weight."""
    lines = []
    for res in results:
        c, e = res['runs']['compact'], res['runs']['expandnet']
        gain = res['gain']
        change = (f'gain of {gain:.2f} points' if gain > 0 else
                  f'loss of {-gain:.2f} points' if gain < 0 else 'no change')
        lines.append(
            f'{res["task"]}: compact {res["metric_name"]} {c["metric"]:.2f}, ExpandNet-CL r=4 '
            f'contracted {e["metric"]:.2f} ({gain:+.2f}): {change}, at identical '
            f'deployed params ({_fmt_int(c["deployed_params"])}) and MACs '
            f'({_fmt_macs(c["deployed_macs"])}); training form '
            f'{_fmt_int(e["training_params"])} params '
            f'({e["training_params"] / c["training_params"]:.1f}x), '
            f'{e["time_per_iter"] / c["time_per_iter"]:.2f}x the compact time per iteration.')
    if quick:
        lines.append('This was a --quick smoke test (tiny data, a few iterations): the numbers '
                     'say that the path works, nothing about ExpandNets.')
    else:
        lines.append('One seed is one sample: a difference of a few points can be seed noise. '
                     'The spread across seeds (and longer schedules) is for a later study; '
                     'rerun with --seed N to add samples.')
    return lines


def write_report(results: list[dict], args: argparse.Namespace, info: dict[str, Any],
                 data: dict[str, Any], wall: float, loads: tuple[str, str]) -> str:
    """Writes ``report.md`` and ``report.json`` into the work dir.

    Args:
        results: Per-task results of :func:`run_task`.
        args: Command-line arguments.
        info: :func:`machine_info`.
        data: Data settings and roots.
        wall: Wall time of the whole demo in seconds.
        loads: Load averages at the start and the end.

    Returns:
        The path of ``report.md``.
    """
    rows = summary_rows(results)
    cmd = 'python tools/demo.py ' + ' '.join(shlex.quote(a) for a in args.argv)
    md = ['# expand_mm demo: compact vs ExpandNet-CL r=4 (contracted)', '']
    if args.quick:
        md += ['> **--quick smoke test**: tiny data, a few iterations. The numbers below are '
               'meaningless; they only show that every step ran.', '']
    md += ['## Results', '', format_markdown_table(SUMMARY_HEADER, rows), '',
           'Score: COCO box mAP (IoU .50:.95, mmdet `CocoMetric`) for det, mIoU over '
           'background + 10 digits (mmseg `IoUMetric`) for seg, both in percent, on the '
           'validation set, for the *deployed* checkpoints evaluated with the compact config. '
           'params / MACs: the deployed model (MACs of one forward at the input size, '
           'mmengine\'s counter); training-form params: the model as trained (the ExpandNet\'s '
           'factors). train s/iter: median of the logged iteration times (wall clock), in '
           'brackets the training process\'s CPU seconds per iteration (with one compute '
           'thread: the wall time the iteration takes on an otherwise idle core); '
           'infer ms/img: '
           'median `test_step` time for one image (preprocessing, network, postprocessing), '
           'both models interleaved.', '']
    md += [f'- {line}' for line in verdicts(results, args.quick)] + ['']
    for res in results:
        extra = ', '.join(
            f'{v}: {k} {res["runs"][v]["extra_metrics"][k]:.2f}'
            for v in VARIANTS for k in res['runs'][v]['extra_metrics'])
        if extra:
            md.append(f'- {res["task"]} further metrics: {extra}')
    md += ['', '![report](report.png)', '']
    md += ['Predictions side by side: ' + ', '.join(
        f'[{osp.basename(r["predictions"])}]({osp.basename(r["predictions"])})'
        for r in results), '']
    md += ['## Commands', '', '```bash', cmd, '# equivalent to:']
    if not data['up_to_date']:
        md.append(data['command'])
    for res in results:
        md += res['commands']
    md += ['```', '',
           '(The demo skips the in-training validation of tools/train.py: it evaluates the '
           'deployed checkpoints instead.'
           + (' --quick also shrinks the schedule, the batch and the loaders; see Settings.'
              if args.quick else '') + ')', '']
    md += ['## Settings', '']
    for res in results:
        for variant in VARIANTS:
            run = res['runs'][variant]
            opt = run['optimizer']
            rates = ''
            if run['optim_constructor']:
                rates = f' (built by {run["optim_constructor"]}' + (
                    f', paramwise_cfg {run["paramwise_cfg"]})' if run['paramwise_cfg']
                    else ', its defaults)')
            md.append(f'- {res["task"]} / {variant}: `{run["config"]}`, {run["iters"]} '
                      f'iterations x batch {run["batch_size"]}, input '
                      f'{run["input_size"][0]}x{run["input_size"][1]}, {opt.get("type")} '
                      f'lr {opt.get("lr")}{rates}, seed {args.seed}; trained in '
                      f'{run["train_wall"]:.0f} s; deployed checkpoint '
                      f'`{run["deployed_checkpoint"]}`')
    made = ('up to date, reused' if data['up_to_date']
            else f'generated in {data["seconds"]:.0f} s')
    md.append(f'- data ({made}): `{data["out"]}`, {data["settings"]}')
    md += ['', '## Machine', '',
           f'- {info["cpu"]}, {info["cpu_count"]} CPUs ({info["usable_cpus"]} usable), torch '
           f'{info["torch"]} with {info["torch_threads"]} intra-op thread(s) '
           f'({info.get("threads_why", "")}), OMP_WAIT_POLICY='
           f'{os.environ.get("OMP_WAIT_POLICY")}, accelerator: '
           f'{info["cuda"] or "none (CPU)"}, trained on {results[0]["runs"]["compact"]["device"]}',
           f'- Python {info["python"]}, {info["platform"]}',
           f'- load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]} '
           '(other jobs on a shared machine slow every timing alike)',
           f'- wall time of the whole demo: {wall:.0f} s ({wall / 60:.1f} min)', '']
    path = osp.join(args.work_dir, 'report.md')
    with open(path, 'w') as f:
        f.write('\n'.join(md))
    summary = dict(
        quick=args.quick, seed=args.seed, wall_time_s=wall, machine=info, loads=loads,
        data={k: v for k, v in data.items() if k != 'settings'} | dict(
            settings=str(data['settings'])),
        tasks={res['task']: dict(
            metric_name=res['metric_name'], gain=res['gain'],
            runs={v: {k: val for k, val in res['runs'][v].items() if k != 'scalars'}
                  for v in VARIANTS}) for res in results})
    with open(osp.join(args.work_dir, 'report.json'), 'w') as f:
        json.dump(summary, f, indent=2, default=str)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        Process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    start = time.perf_counter()
    load_start = load_average()
    os.makedirs(args.work_dir, exist_ok=True)
    logger = MMLogger.get_instance('expand_mm_demo', logger_name='expand_mm_demo',
                                   log_file=osp.join(args.work_dir, 'demo.log'))
    tasks = ['det', 'seg'] if args.task == 'both' else [args.task]
    jobs = resolve_jobs(args.jobs, len(tasks))
    threads, threads_why = configure_threads(jobs)
    info = machine_info()
    info['threads_why'] = threads_why
    logger.info(f'expand_mm demo: tasks {tasks}, seed {args.seed}, '
                f'{"QUICK smoke test, " if args.quick else ""}work dir {args.work_dir}; '
                f'{info["cpu_count"]} CPUs, torch threads {info["torch_threads"]} '
                f'({threads_why}), '
                f'CUDA: {info["cuda"] or "none"}; load average {load_start}')

    data = ensure_data(args.data_root, tasks, args.quick, logger)
    roots = data['roots']

    results = run_tasks(tasks, args, roots, logger, jobs)

    draw_report_figure(results, osp.join(args.work_dir, 'report.png'), args.quick)
    wall = time.perf_counter() - start
    report = write_report(results, args, info, data, wall, (load_start, load_average()))

    rows = summary_rows(results)
    lines = ['', '=' * 100,
             'expand_mm demo -- deployed models (the ExpandNet row is its contracted '
             'checkpoint, evaluated with the compact config)']
    if args.quick:
        lines.append('--quick smoke test: tiny data, a few iterations; NUMBERS ARE MEANINGLESS')
    lines += ['', format_text_table(SUMMARY_HEADER, rows), '']
    lines += verdicts(results, args.quick)
    lines += ['', f'wall time {wall:.0f} s ({wall / 60:.1f} min), load average at start '
              f'{load_start}, at end {load_average()}',
              f'report: {report}, {osp.join(args.work_dir, "report.png")}, ' + ', '.join(
                  r['predictions'] for r in results), '=' * 100]
    print('\n'.join(lines), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
