"""Benchmark an ExpandNet config: training cost, inference cost, contraction, size.

    python tools/benchmark.py [CONFIG] [--batch-size 8] [--img-size 320 [320]]
                              [--budget STEP [MEMORY]]
                              [--iters 10] [--explicit-iters N] [--warmup 2]
                              [--device cpu|cuda] [--threads N] [--out JSON]
                              [--cfg-options KEY=VALUE ...]

CONFIG is an ExpandNet config (``model.type == 'ExpandNet'``); its inner
``model`` is the compact model. Pretrained-weight loading is switched off (the
weights do not change any cost measured here). On the same random batch, after
``--warmup`` rounds, the variants run interleaved (A B C A B C ...) so that a
slow phase of a shared machine hits all of them alike; every figure is the
median over ``--iters`` rounds:

- train step (``model.train_step``: data preprocessor, loss, backward, SGD step
  through an MMEngine ``OptimWrapper``) of the compact model, the ExpandNet in
  explicit mode and the ExpandNet in online mode: time and peak memory (the
  ExpandNet's own ``train_step``, which defers the factor gradients past the
  activations' peak as in training);
- inference (``mode='tensor'`` under ``no_grad``) of the compact model, the
  ExpandNet (online, eval) and its contraction;
- the time of ``contract_model`` on the whole model;
- parameters and MACs per image (mmengine's ``FlopAnalyzer``) of the compact
  model, the training form (explicit chain) and the deployed (contracted)
  model; and forward MACs per step, where online mode pays the compact convs
  plus one composition of every expanded kernel (independent of the batch).

Peak memory is the peak of the bytes allocated during one train step above
what was allocated when it began (activations, gradients, temporaries, new
optimizer state), plus the persistent training state (parameters, buffers,
optimizer state). On CUDA the step peak is ``torch.cuda.max_memory_allocated``;
on CPU it is the peak of the running sum of the allocations and frees that
``torch.profiler`` records with ``profile_memory=True`` (tensor allocations,
not process RSS).

Beside the targets the tool prints two floors: peak memory cannot go below the
online persistent state (the factors and their optimizer state exist) plus the
larger of the compact step's peak and the online gradients (every factor's
gradient exists when the optimizer steps), and by MACs the online step costs
the compact forward plus one composition of every kernel.

With ``--budget`` (or a config whose ExpandNet has a ``budget``) the ExpandNet
measured is the planned one (:mod:`expand_mm.budget`), at the config's training
batch size and input size unless ``--batch-size`` / ``--img-size`` say
otherwise, and the plan's predicted step-time and peak-memory ratios are printed
beside the measured ones.

A table with every figure and its ratio to the compact model is printed, and
everything is written as JSON to ``--out`` (default
``work_dirs/benchmark/<config stem>.json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import os.path as osp
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

# Kineto (the CPU memory profiler's backend) otherwise logs a GPU-probe error on
# every profiled step; read when torch loads.
os.environ.setdefault('KINETO_LOG_LEVEL', '5')

import torch  # noqa: E402
from torch import nn  # noqa: E402

import expand_mm  # noqa: E402
from expand_mm.cli import DefaultsHelpFormatter, run_tool  # noqa: E402
from expand_mm.cost import count_macs, count_training_macs, peak_step_bytes  # noqa: E402
from expand_mm.models import deployable_model_cfg  # noqa: E402
from expand_mm.models.expandnet import config_training_settings  # noqa: E402
from expand_mm.probe import probe_forward  # noqa: E402
from expand_mm.surgery import count_params, expanded_layers, set_expand_mode  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import MODELS, DefaultScope  # noqa: E402
from expand_mm.errors import ConfigError  # noqa: E402

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.relpath(osp.join(
    REPO_ROOT, 'configs', 'expandnet',
    'expandnet-cl-r4_yolov3-mobilenetv2_8xb24-320-300e_coco.py'))
TRAIN_VARIANTS = ('compact', 'explicit', 'online')
INFER_VARIANTS = ('compact', 'online', 'contracted')
TARGETS = dict(online_train_time=1.15, online_train_peak_memory=1.10)
MIB = 1024 ** 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; the defaults are the cost targets' setting (batch 8, 320x320)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('config', nargs='?', default=DEFAULT_CONFIG,
                        help='ExpandNet config (model.type == "ExpandNet")')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='default: 8, or with a budget the config\'s training batch size')
    parser.add_argument('--img-size', type=int, nargs='+', default=None,
                        metavar='S', help='square size S, or H W (default: 320, or with a '
                        'budget the config\'s training input size)')
    parser.add_argument('--budget', type=float, nargs='+', default=None, metavar='RATIO',
                        help='measure the ExpandNet planned for this budget: STEP [MEMORY], '
                        'the largest step-time and peak-memory ratios to the compact model '
                        '(one value: both); the config\'s own model.budget is used when '
                        'this is not given')
    parser.add_argument('--iters', type=int, default=10,
                        help='timed rounds (each runs every variant once)')
    parser.add_argument('--explicit-iters', type=int, default=None,
                        help='rounds that also time the explicit train step (default: '
                        'every round); it costs ~10x a compact step and is reported for '
                        'comparison, so fewer rounds buy more rounds of the others; 0 '
                        'skips it (time and memory), e.g. at sizes where its ~3x memory '
                        'does not fit')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--contract-iters', type=int, default=5,
                        help='timed runs of contract_model')
    parser.add_argument('--device', choices=('cpu', 'cuda'),
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: torch\'s own choice)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None,
                        help='JSON file (default: work_dirs/benchmark/<config stem>.json)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config settings, as in mm tools, e.g. '
                        '"model.ratio=2" or "model.exclude=[backbone.stage4.*]" (recorded '
                        'in the JSON)')
    args = parser.parse_args(argv)
    if args.img_size is not None and len(args.img_size) == 1:
        args.img_size = args.img_size * 2
    if args.img_size is not None and len(args.img_size) != 2:
        parser.error(f'--img-size takes S or H W, got {args.img_size}')
    if args.budget is not None and len(args.budget) > 2:
        parser.error(f'--budget takes STEP [MEMORY], got {args.budget}')
    if args.explicit_iters is None:
        args.explicit_iters = args.iters
    for key in ('batch_size', 'iters'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f'--{key.replace("_", "-")} must be >= 1')
    if args.explicit_iters < 0:
        parser.error('--explicit-iters must be >= 0 (0: skip the explicit train step)')
    args.explicit_iters = min(args.explicit_iters, args.iters)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available here')
    if args.out is None:
        stem = osp.splitext(osp.basename(args.config))[0]
        args.out = osp.join('work_dirs', 'benchmark', f'{stem}.json')
    return args


# ----------------------------------------------------------------- building

def disable_pretrained(cfg: Any) -> None:
    """Switch off every pretrained-weight load in a model config, in place.

    ``pretrained=...`` becomes ``None`` and ``init_cfg``s of type ``Pretrained``
    are dropped, at any depth: nothing may be downloaded, and weights do not
    change what is measured.
    """
    if isinstance(cfg, dict):
        if cfg.get('pretrained') is not None:
            cfg['pretrained'] = None
        init_cfg = cfg.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            cfg['init_cfg'] = None
        elif isinstance(init_cfg, list):
            cfg['init_cfg'] = [c for c in init_cfg
                               if not (isinstance(c, dict) and c.get('type') == 'Pretrained')]
        for value in cfg.values():
            disable_pretrained(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            disable_pretrained(value)


def load_config(path: str, cfg_options: dict | None = None) -> Config:
    """Read an ExpandNet config, with ``cfg_options`` merged in.

    Raises:
        ValueError: Naming the key, if the model is not an ExpandNet.
    """
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if deployable_model_cfg(cfg.model) is cfg.model:
        raise ConfigError(f'{path}: model.type is {cfg.model.get("type")!r}; the benchmark '
                          "needs an ExpandNet config (model.type == 'ExpandNet')")
    return cfg


def _fit_preprocessor(model_cfg: dict, img_size: tuple[int, int]) -> None:
    """Make the preprocessor keep the benchmark size.

    mmseg's ``SegDataPreProcessor`` pads every batch to ``size`` (the training
    crop, e.g. 512x1024); left as is, every variant would run at the crop size
    whatever ``--img-size`` says. mmdet's ``batch_augments`` (YOLOX's
    ``BatchSyncRandomResize``) would resize batches at random, and read the
    iteration from a runner's message hub; they are dropped.
    """
    pre = model_cfg.get('data_preprocessor')
    if isinstance(pre, dict) and pre.get('size') is not None:
        pre['size'] = tuple(img_size)
    if isinstance(pre, dict) and pre.get('batch_augments'):
        pre['batch_augments'] = None


def apply_budget(cfg: Config, args: argparse.Namespace) -> bool:
    """Settle the batch size and input size, and the budget the ExpandNet is planned for.

    ``--budget`` replaces the config's ``model.budget`` limits (keeping its
    allowed ratios). With a budget, the batch size and input size default to the
    config's training ones (:func:`expand_mm.models.expandnet.config_training_settings`),
    and the budget is planned at the benchmark's batch size and input size, so
    that the prediction and the measurement are of the same step. Without one
    they default to 8 and 320x320. Returns whether a budget is measured.
    """
    budget = dict(cfg.model.get('budget') or {})
    if args.budget is not None:
        step, memory = (args.budget * 2)[:2]
        budget.update(train_step=step, train_memory=memory)
    if not budget:
        args.batch_size = args.batch_size or 8
        args.img_size = args.img_size or [320, 320]
        return False
    batch_size, img_size = config_training_settings(cfg)
    args.batch_size = args.batch_size or batch_size
    args.img_size = list(args.img_size or img_size)
    budget.update(batch_size=args.batch_size, img_size=tuple(args.img_size))
    cfg.model['budget'] = budget
    return True


def build_models(cfg: Config, img_size: tuple[int, int], device: torch.device,
                 seed: int) -> tuple[nn.Module, nn.Module]:
    """The compact model (inner cfg) and the ExpandNet (the config's own builder).

    Both are in training mode on ``device``; SyncBN becomes BN (one process).
    """
    from mmengine.model import revert_sync_batchnorm

    inner = copy.deepcopy(deployable_model_cfg(cfg.model))
    disable_pretrained(inner)
    _fit_preprocessor(inner, img_size)
    expand_cfg = copy.deepcopy(cfg.model)
    expand_cfg['model'] = inner
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        torch.manual_seed(seed)
        compact = MODELS.build(copy.deepcopy(inner))
        compact.init_weights()
        torch.manual_seed(seed)
        expanded = MODELS.build(expand_cfg)
    if not expanded_layers(expanded):
        raise ConfigError('the ExpandNet config expanded no layer')
    compact = revert_sync_batchnorm(compact).to(device).train()
    expanded = revert_sync_batchnorm(expanded).to(device).train()
    return compact, expanded


def num_classes(model: nn.Module) -> int:
    """Classes of a detector's ``bbox_head`` or a segmentor's ``decode_head``."""
    for head in ('bbox_head', 'decode_head'):
        if hasattr(model, head):
            return int(getattr(model, head).num_classes)
    raise ConfigError(f'{type(model).__name__} has neither bbox_head nor decode_head: '
                      'only mmdet detectors and mmseg segmentors are supported')


def make_batch(model: nn.Module, batch_size: int, img_size: tuple[int, int],
               seed: int) -> dict:
    """A random training batch in the model's data format (before preprocessing).

    Detectors get ``DetDataSample``s with 1-9 random boxes per image (mmdet's
    ``demo_mm_inputs``); segmentors get ``SegDataSample``s with a random
    ``gt_sem_seg``. Images are uint8 like a loader's.
    """
    h, w = img_size
    n_cls = num_classes(model)
    if hasattr(model, 'bbox_head'):
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch_size, image_shapes=(3, h, w), num_classes=n_cls)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                             pad_shape=(h, w), scale_factor=(1.0, 1.0),
                                             flip=False, flip_direction=None))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, n_cls, (1, h, w), generator=gen, dtype=torch.long))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_optim_wrapper(model: nn.Module, cfg: Config):
    """A plain (fp32) ``OptimWrapper`` around SGD for ``model``.

    Learning rate, momentum, weight decay, gradient clipping and
    ``paramwise_cfg`` come from the config when its optimizer is SGD, so the
    step costs what a real one does; AMP is not used (it does not exist on CPU
    and would make the variants incomparable across devices).
    """
    from mmengine.optim import build_optim_wrapper as build

    src = cfg.get('optim_wrapper') or {}
    opt = dict(src.get('optimizer') or {})
    sgd = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4)
    if opt.get('type') == 'SGD':
        sgd.update({k: opt[k] for k in ('lr', 'momentum', 'weight_decay', 'nesterov')
                    if k in opt})
    wrapper = dict(type='OptimWrapper', optimizer=sgd)
    if src.get('clip_grad'):
        wrapper['clip_grad'] = dict(src['clip_grad'])
    if src.get('paramwise_cfg'):
        wrapper['paramwise_cfg'] = dict(src['paramwise_cfg'])
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        return build(model, wrapper)


# ------------------------------------------------------------------ measuring

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """``(wall seconds, process CPU seconds, result)`` of one call.

    The device is synchronised on both ends. The CPU time (all threads of this
    process) only counts the time the process actually ran: on a shared CPU
    it is far less sensitive to other processes than the wall time.
    """
    _sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


def state_bytes(model: nn.Module, optim_wrapper) -> int:
    """Bytes of the persistent training state: parameters, buffers, optimizer state."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optim_wrapper.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of one gradient per trainable parameter: what a step's end holds besides the state."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def composition_macs(model: nn.Module) -> int:
    """Multiply-adds of composing every expanded kernel once (online forward).

    It grows with channels and kernel sizes, not with batch or image size.
    """
    return sum(layer.composition_macs() for _, layer in expanded_layers(model))


def _stats(samples: list[float]) -> dict[str, Any]:
    return dict(median=statistics.median(samples), min=min(samples), max=max(samples),
                samples=samples)


def bench_training(compact: nn.Module, expanded: nn.Module, data: dict, cfg: Config,
                   device: torch.device, iters: int, warmup: int,
                   explicit_iters: int | None = None
                   ) -> tuple[dict[str, dict[str, dict]], dict[str, dict], dict[str, float]]:
    """Interleaved train steps of the three variants: times, memory, last losses.

    Times are ``{'wall': {variant: stats}, 'cpu': {variant: stats}}`` in ms.

    Explicit and online share the ExpandNet's parameters and optimizer (they
    are the same model, trained two ways). ``explicit_iters=0`` leaves the
    explicit variant out of the results.
    """
    wrappers = dict(compact=build_optim_wrapper(compact, cfg))
    wrappers['explicit'] = wrappers['online'] = build_optim_wrapper(expanded, cfg)
    models = dict(compact=compact, explicit=expanded, online=expanded)
    losses: dict[str, float] = {}

    def step(name: str) -> Callable[[], Any]:
        # The mode switch stays outside the timed call.
        if name != 'compact':
            set_expand_mode(expanded, name)
        return lambda: models[name].train_step(data, wrappers[name])

    n_explicit = iters if explicit_iters is None else explicit_iters
    variants = TRAIN_VARIANTS if n_explicit else tuple(
        v for v in TRAIN_VARIANTS if v != 'explicit')
    times: dict[str, dict[str, list[float]]] = dict(
        wall={n: [] for n in variants}, cpu={n: [] for n in variants})
    # The explicit rounds are spread evenly over the timed ones (a drift of
    # the machine's speed hits every variant alike).
    explicit_rounds = {warmup + (k * iters) // n_explicit for k in range(n_explicit)}
    for i in range(warmup + iters):
        for name in variants:
            if name == 'explicit' and i >= warmup and i not in explicit_rounds:
                continue
            wall, cpu, log_vars = timed(step(name), device)
            losses[name] = float(log_vars['loss'].detach())
            if i >= warmup:
                times['wall'][name].append(wall * 1e3)
                times['cpu'][name].append(cpu * 1e3)
    # Memory is measured in its own pass: the CPU profiler slows the step down.
    peaks: dict[str, dict] = {}
    for name in variants:
        step_bytes = peak_step_bytes(step(name), device)
        state = state_bytes(models[name], wrappers[name])
        peaks[name] = dict(step_peak_mib=step_bytes / MIB, state_mib=state / MIB,
                           peak_mib=(step_bytes + state) / MIB,
                           grad_mib=gradient_bytes(models[name]) / MIB)
    set_expand_mode(expanded, 'online')
    return ({kind: {n: _stats(t) for n, t in by_name.items()}
             for kind, by_name in times.items()}, peaks, losses)


@torch.no_grad()
def bench_inference(models: dict[str, nn.Module], inputs: torch.Tensor,
                    device: torch.device, iters: int, warmup: int
                    ) -> dict[str, dict[str, dict]]:
    """Interleaved ``mode='tensor'`` forwards of eval models under ``no_grad``.

    Returns ``{'wall': {variant: stats}, 'cpu': {variant: stats}}`` in ms.
    """
    times: dict[str, dict[str, list[float]]] = dict(
        wall={n: [] for n in models}, cpu={n: [] for n in models})
    for i in range(warmup + iters):
        for name, model in models.items():
            wall, cpu, _ = timed(lambda: probe_forward(model, inputs), device)
            if i >= warmup:
                times['wall'][name].append(wall * 1e3)
                times['cpu'][name].append(cpu * 1e3)
    return {kind: {n: _stats(t) for n, t in by_name.items()}
            for kind, by_name in times.items()}


# ------------------------------------------------------------------ reporting

def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and thread count, for the record."""
    import mmengine
    env = dict(device=str(device), torch=torch.__version__, mmengine=mmengine.__version__,
               expand_mm=expand_mm.__version__, threads=torch.get_num_threads(),
               python=platform.python_version(), cpu=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count())
    for pkg in ('mmdet', 'mmseg', 'mmcv'):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if hasattr(os, 'getloadavg'):
        # Other processes on the same cores make every figure noisy (and
        # multi-threaded small ops pathologically slow): keep it on record.
        env['load_average_1min'] = round(os.getloadavg()[0], 2)
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
        env['cuda'] = torch.version.cuda
    return env


def _ratio(value: float, ref: float) -> float | None:
    return value / ref if ref else None


def build_figures(train: dict, memory: dict, infer: dict, contract: dict,
                  size: dict, cpu_times: bool) -> list[dict[str, Any]]:
    """One row per figure: ``name``, ``variant``, ``value``, ``unit``, ``ratio``.

    ``ratio`` is to the compact model's same figure (``None`` where there is no
    compact counterpart, e.g. the contraction time). ``cpu_times`` adds the
    process-CPU-time rows (meaningless on CUDA, where the CPU mostly waits).
    """
    rows: list[dict[str, Any]] = []

    def add(name: str, variant: str, value: float, unit: str, ref: float | None) -> None:
        rows.append(dict(name=name, variant=variant, value=value, unit=unit,
                         ratio=None if ref is None else _ratio(value, ref)))

    trained = [v for v in TRAIN_VARIANTS if v in memory]  # explicit may be skipped
    for kind, suffix in (('wall', ''), ('cpu', '_cpu'))[:2 if cpu_times else 1]:
        for v in trained:
            add(f'train_step{suffix}_time', v, train[kind][v]['median'], 'ms',
                train[kind]['compact']['median'])
    for key in ('peak_mib', 'step_peak_mib', 'state_mib'):
        for v in trained:
            add(f'train_{key.replace("_mib", "")}_memory', v, memory[v][key], 'MiB',
                memory['compact'][key])
    for kind, suffix in (('wall', ''), ('cpu', '_cpu'))[:2 if cpu_times else 1]:
        for v in INFER_VARIANTS:
            add(f'inference{suffix}_time', v, infer[kind][v]['median'], 'ms',
                infer[kind]['compact']['median'])
    add('contract_time', 'contract_model', contract['median'], 's', None)
    for v, key in (('compact', 'compact'), ('training', 'expanded'),
                   ('deployed', 'contracted')):
        add('params', v, size['params'][key], 'count', size['params']['compact'])
    for v, key in (('compact', 'compact'), ('training_explicit', 'explicit'),
                   ('deployed', 'contracted')):
        add('macs_per_image', v, size['macs'][key], 'MAC', size['macs']['compact'])
    # Online composes each kernel once per step, whatever the batch: compare
    # whole-batch forwards, where that fixed cost shows its real weight.
    for v in ('compact', 'explicit', 'online'):
        add('forward_macs_per_step', v, size['macs_per_step'][v], 'MAC',
            size['macs_per_step']['compact'])
    add('composition_macs_per_step', 'online', size['composition_macs'], 'MAC',
        size['macs_per_step']['compact'])
    return rows


def budget_check(plan: Any, ratio: dict, memory: dict) -> dict[str, Any]:
    """The plan's predicted ratios beside the measured ones (``ratio``: the figures' ratios)."""
    measured = dict(train_step=ratio[('train_step_time', 'online')],
                    train_step_cpu=ratio.get(('train_step_cpu_time', 'online')),
                    train_memory=ratio[('train_peak_memory', 'online')],
                    compact_step_peak_mib=memory['compact']['step_peak_mib'],
                    compact_peak_mib=memory['compact']['peak_mib'])
    predicted = dict(train_step=plan.train_step, train_memory=plan.train_memory,
                     compact_step_peak_mib=plan.compact.step_peak_bytes / MIB,
                     compact_peak_mib=plan.compact.peak_bytes / MIB)
    return dict(budget=dict(train_step=plan.budget.train_step,
                            train_memory=plan.budget.train_memory),
                predicted=predicted, measured=measured,
                ratios={layer.path: layer.ratio for layer in plan.layers})


def format_budget_check(check: dict[str, Any]) -> str:
    """Lines of predicted vs measured ratios for :func:`budget_check`'s result."""
    predicted, measured, budget = check['predicted'], check['measured'], check['budget']
    cpu = (f' (cpu time {measured["train_step_cpu"]:.3f}x)'
           if measured.get('train_step_cpu') is not None else '')
    return '\n'.join([
        f'budget train_step <= {budget["train_step"]}: predicted {predicted["train_step"]:.3f}x, '
        f'measured {measured["train_step"]:.3f}x{cpu}',
        f'budget train_memory <= {budget["train_memory"]}: predicted '
        f'{predicted["train_memory"]:.3f}x, measured {measured["train_memory"]:.3f}x',
        f'  compact peak predicted {predicted["compact_peak_mib"]:,.1f} MiB, measured '
        f'{measured["compact_peak_mib"]:,.1f} MiB (step peak: {predicted["compact_step_peak_mib"]:,.1f}'
        f' / {measured["compact_step_peak_mib"]:,.1f} MiB)'])


def _fmt(value: float, unit: str) -> str:
    if unit == 'count':
        return f'{value / 1e6:,.3f} M'
    if unit == 'MAC':
        return f'{value / 1e9:,.3f} G'
    if unit == 's':
        return f'{value:,.3f} s'
    return f'{value:,.1f} {unit}'


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table of :func:`build_figures` rows."""
    lines = [f'{"figure":<26}{"variant":<20}{"value":>16}{"x compact":>12}']
    lines.append('-' * len(lines[0]))
    for r in rows:
        ratio = '' if r['ratio'] is None else f'{r["ratio"]:.3f}'
        lines.append(f'{r["name"]:<26}{r["variant"]:<20}{_fmt(r["value"], r["unit"]):>16}'
                     f'{ratio:>12}')
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = ' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    cfg = load_config(args.config, args.cfg_options)
    budgeted = apply_budget(cfg, args)
    img_size = tuple(args.img_size)
    env = environment(device)
    print(f'command: {command}')
    print('env: ' + ', '.join(f'{k}={v}' for k, v in env.items()))
    if device.type == 'cpu' and env.get('load_average_1min', 0) > (os.cpu_count() or 1) - 0.5:
        print(f'warning: load average {env["load_average_1min"]} on {os.cpu_count()} cores: '
              'other processes compete for the CPU; timings will be noisy (--threads 1 '
              'suffers least)')

    logger = MMLogger.get_current_instance()
    level = logger.level
    # The builder logs the whole per-layer expansion table; one line is enough here.
    logger.setLevel(logging.WARNING)
    try:
        compact, expanded = build_models(cfg, img_size, device, args.seed)
    finally:
        logger.setLevel(level)
    report = expanded.expansion_report
    if report.plan is not None:
        print(report.plan)
    print(f'{len(report.layers)} layers expanded ({cfg.model.get("strategy", "cl")}, '
          f'r={report.ratio_summary}): {report.model_params_before:,} -> '
          f'{report.model_params_after:,} params')
    data = make_batch(compact, args.batch_size, img_size, args.seed)

    print(f'train: {args.warmup} warm-up + {args.iters} rounds of {TRAIN_VARIANTS} '
          f'(explicit in {args.explicit_iters} of them; batch {args.batch_size}, '
          f'{img_size[0]}x{img_size[1]})', flush=True)
    train, memory, losses = bench_training(compact, expanded, data, cfg, device,
                                           args.iters, args.warmup, args.explicit_iters)

    contract_times = []
    for _ in range(max(args.contract_iters, 1)):
        seconds, _, contracted = timed(lambda: expand_mm.contract_model(expanded), device)
        contract_times.append(seconds)
    contract = _stats(contract_times)

    compact.eval()
    expanded.eval()
    contracted.eval()
    with torch.no_grad():
        inputs = compact.data_preprocessor(data, False)['inputs']
    errors = expand_mm.verify_contraction(expanded, contracted, inputs[:1],
                                          forward_fn=probe_forward)
    print(f'inference: {args.warmup} warm-up + {args.iters} rounds of {INFER_VARIANTS}',
          flush=True)
    infer = bench_inference(dict(compact=compact, online=expanded, contracted=contracted),
                            inputs, device, args.iters, args.warmup)

    # From the chains' shapes on the meta device: equal to tracing the explicit
    # model, without its memory (what --explicit-iters 0 is for).
    contracted_macs, explicit_macs = count_training_macs(expanded, contracted, img_size)
    compact_macs = count_macs(compact, img_size)
    composition = composition_macs(expanded)
    batch = args.batch_size
    size = dict(
        params=dict(compact=count_params(compact), expanded=count_params(expanded),
                    contracted=count_params(contracted)),
        macs=dict(compact=compact_macs, explicit=explicit_macs,
                  contracted=contracted_macs),
        composition_macs=composition,
        macs_per_step=dict(compact=compact_macs * batch, explicit=explicit_macs * batch,
                           online=compact_macs * batch + composition))

    rows = build_figures(train, memory, infer, contract, size, device.type == 'cpu')
    ratio = {(r['name'], r['variant']): r['ratio'] for r in rows}
    targets = dict(
        online_train_time=dict(
            ratio=ratio[('train_step_time', 'online')], max=TARGETS['online_train_time']),
        online_train_peak_memory=dict(
            ratio=ratio[('train_peak_memory', 'online')],
            max=TARGETS['online_train_peak_memory']),
        contracted_same_params=dict(
            ok=size['params']['contracted'] == size['params']['compact']),
        contracted_same_macs=dict(ok=size['macs']['contracted'] == size['macs']['compact']),
        contract_under_1s=dict(ok=contract['median'] < 1.0))
    if device.type == 'cpu':
        # Same target on CPU time: the figure a busy shared CPU disturbs least.
        targets['online_train_cpu_time'] = dict(
            ratio=ratio[('train_step_cpu_time', 'online')], max=TARGETS['online_train_time'])
    for t in targets.values():
        if 'ratio' in t:
            t['ok'] = t['ratio'] is not None and t['ratio'] <= t['max']
    # What no online implementation can go below: the factors and their
    # optimizer state (persistent) plus the larger of the compact step's own
    # peak and the factors' gradients, which all exist when the optimizer
    # steps -- and, in MACs, the compact forward plus one composition per step.
    targets['online_train_peak_memory']['floor'] = (
        (max(memory['compact']['step_peak_mib'], memory['online']['grad_mib'])
         + memory['online']['state_mib']) / memory['compact']['peak_mib'])
    targets['online_train_time']['floor_by_macs'] = (
        size['macs_per_step']['online'] / size['macs_per_step']['compact'])

    memory_measure = (
        'cuda: torch.cuda.max_memory_allocated during a step minus memory_allocated at its '
        'start' if device.type == 'cuda' else
        'cpu: peak of the running sum of tensor allocations/frees recorded by '
        'torch.profiler(profile_memory=True) during a step')
    return dict(
        config=args.config, command=command, env=env,
        settings=dict(batch_size=args.batch_size, img_size=list(img_size), iters=args.iters,
                      explicit_iters=args.explicit_iters,
                      warmup=args.warmup, contract_iters=args.contract_iters,
                      seed=args.seed, cfg_options=args.cfg_options),
        memory_measure=memory_measure + '; plus persistent state (parameters, buffers, '
        'optimizer state)',
        budget=budget_check(report.plan, ratio, memory) if budgeted else None,
        expansion=dict(num_layers=len(report.layers), ratio=report.to_dict()['ratio'],
                       strategy=cfg.model.get('strategy', 'cl'),
                       params_before=report.model_params_before,
                       params_after=report.model_params_after),
        figures=rows, train_step_ms=train, train_memory_mib=memory, inference_ms=infer,
        contract_s=contract, params=size['params'], macs_per_image=size['macs'],
        forward_macs_per_step=size['macs_per_step'],
        composition_macs_per_step=size['composition_macs'],
        contraction_error=errors, final_losses=losses, targets=targets)


def main(argv: list[str] | None = None) -> int:
    """Benchmark, print the table, write the JSON."""
    args = parse_args(argv)
    result = run(args)
    print(format_table(result['figures']))
    print(f'memory: {result["memory_measure"]}')
    print(f'contraction error: max relative {result["contraction_error"]["max_rel"]:.2e}')
    for name, t in result['targets'].items():
        detail = f' ({t["ratio"]:.3f} <= {t["max"]})' if 'ratio' in t else ''
        print(f'target {name}: {"met" if t["ok"] else "MISSED"}{detail}')
    # The total peak mixes two things; show which one a miss comes from.
    mem = result['train_memory_mib']
    print(f'  online peak = step peak {mem["online"]["step_peak_mib"]:,.1f} MiB '
          f'({mem["online"]["step_peak_mib"] / mem["compact"]["step_peak_mib"]:.3f}x compact) '
          f'+ state {mem["online"]["state_mib"]:,.1f} MiB '
          f'({mem["online"]["state_mib"] / mem["compact"]["state_mib"]:.3f}x: parameters, '
          'buffers, optimizer state)')
    t = result['targets']
    print(f'  floors: peak memory >= {t["online_train_peak_memory"]["floor"]:.3f}x (the factors '
          'and their optimizer state + the larger of the compact step peak and the '
          'gradients); train time ~ '
          f'{t["online_train_time"]["floor_by_macs"]:.3f}x by MACs (compact forward + one '
          'composition per step)')
    if result['budget'] is not None:
        print(format_budget_check(result['budget']))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
