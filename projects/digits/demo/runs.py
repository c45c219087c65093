"""Training, evaluating and timing the two models of each task."""
from __future__ import annotations

import argparse
import gc
import json
import os.path as osp
import statistics
import time
from typing import Any, Sequence

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import MMLogger
from mmengine.runner import Runner

import expand_mm  # noqa: F401  (registers ExpandNet, YOLOLite, the hooks)
from expand_mm.cost import count_macs
from expand_mm.deploy import compact_checkpoint_path
from expand_mm.models import deployable_model
from expand_mm.surgery import count_params, expanded_layers

from .configs import demo_cfg, test_command, train_command
from .figures import draw_predictions
from .machine import configure_threads
from .tasks import (PREDICTION_IMAGES, REPO_ROOT, STEPS_PER_TASK, TASKS, TIMING_IMAGES,
                    TIMING_IMAGES_QUICK, VARIANT_TITLES, VARIANTS, DemoError, TaskSpec)


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
            raise DemoError(
                f'ContractCheckpointHook wrote no {result["compact_checkpoint"]}; is it in '
                'default_hooks of the ExpandNet config?')
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


def train_variant(spec: TaskSpec, variant: str, args: argparse.Namespace, data_root: str,
                  logger: MMLogger) -> tuple[dict[str, Any], str]:
    """Trains one model of a task (``'compact'`` or ``'expandnet'``) as the demo does.

    Args:
        spec: The task.
        variant: Which of its two configs.
        args: Command-line arguments.
        data_root: The task's dataset root.
        logger: The demo's logger.

    Returns:
        ``(run, command)``: what :func:`train_run` returns plus the checkpoint to
        deploy and the settings the report names, and the equivalent
        ``tools/train.py`` command.
    """
    config = spec.compact_config if variant == 'compact' else spec.expandnet_config
    run_dir = osp.join(args.work_dir, spec.name, variant)
    cfg = demo_cfg(config, spec.name, data_root, run_dir, args.seed, args.quick,
                   f'demo_{spec.name}_{variant}_train', train=True)
    run = train_run(cfg, logger)
    run['deployed_checkpoint'] = (run['compact_checkpoint'] if variant == 'expandnet'
                                  else run['checkpoint'])
    run['config'] = osp.relpath(config, REPO_ROOT)
    run['batch_size'] = cfg.train_dataloader.batch_size
    run['optimizer'] = dict(cfg.optim_wrapper.optimizer)
    run['optim_constructor'] = cfg.optim_wrapper.get('constructor')
    run['paramwise_cfg'] = dict(cfg.optim_wrapper.get('paramwise_cfg') or {})
    return run, train_command(spec, variant, run_dir, args.seed, data_root)


def evaluate_variant(spec: TaskSpec, variant: str, run: dict[str, Any],
                     args: argparse.Namespace, data_root: str,
                     logger: MMLogger) -> tuple[torch.nn.Module, Any, str]:
    """Evaluates and measures one trained model's deployed checkpoint with the compact config.

    Adds ``metrics``, ``metric`` (in percent), ``extra_metrics``,
    ``deployed_params``, ``deployed_macs`` and ``input_size`` to ``run``.

    Args:
        spec: The task.
        variant: ``'compact'`` or ``'expandnet'``.
        run: What :func:`train_variant` returned for it.
        args: Command-line arguments.
        data_root: The task's dataset root.
        logger: The demo's logger.

    Returns:
        ``(model, dataset, command)``: the deployed model in eval mode, the
        test dataset and the equivalent ``tools/test.py`` command.
    """
    eval_dir = osp.join(args.work_dir, spec.name, variant, 'test')
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
    logger.info(f'{spec.name} {VARIANT_TITLES[variant]}: {spec.metric_name} '
                f'{run["metric"]:.2f}')
    return model, dataset, test_command(spec, run['deployed_checkpoint'], eval_dir, data_root)


def check_same_deployed_model(spec: TaskSpec, compact: dict[str, Any],
                              expandnet: dict[str, Any]) -> None:
    """Refuses a contracted ExpandNet whose size differs from the compact model's.

    Args:
        spec: The task.
        compact: The compact model's run, measured.
        expandnet: The ExpandNet's run, measured.

    Raises:
        DemoError: The parameters or the MACs differ.
    """
    if (compact['deployed_params'], compact['deployed_macs']) != (
            expandnet['deployed_params'], expandnet['deployed_macs']):
        raise DemoError(
            f'{spec.name}: the deployed models differ (params {compact["deployed_params"]} vs '
            f'{expandnet["deployed_params"]}, MACs {compact["deployed_macs"]} vs '
            f'{expandnet["deployed_macs"]}); the contracted ExpandNet must be the compact model')


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
    result: dict[str, Any] = dict(task=spec.name, title=spec.title, runs={}, commands=[])
    configs = dict(compact=spec.compact_config, expandnet=spec.expandnet_config)

    def progress(what: str) -> None:
        step[0] += 1
        logger.info(f'[{step[0]}/{total_steps}] {spec.name}: {what}')

    for variant in VARIANTS:
        progress(f'training the {VARIANT_TITLES[variant].split(" →")[0]} model '
                 f'({osp.basename(configs[variant])})')
        result['runs'][variant], command = train_variant(spec, variant, args, data_root, logger)
        result['commands'].append(command)

    models, dataset = {}, None
    for variant in VARIANTS:
        run = result['runs'][variant]
        progress(f'evaluating the deployed {VARIANT_TITLES[variant]} checkpoint with the '
                 f'compact config ({osp.basename(run["deployed_checkpoint"])})')
        models[variant], dataset, command = evaluate_variant(spec, variant, run, args,
                                                             data_root, logger)
        result['commands'].append(command)

    progress('timing inference of both deployed models and drawing predictions')
    per_image, preds = time_inference(
        models, dataset, TIMING_IMAGES_QUICK if args.quick else TIMING_IMAGES)
    for variant in VARIANTS:
        result['runs'][variant]['infer_time'] = per_image[variant]
    compact, expandnet = (result['runs'][v] for v in VARIANTS)
    check_same_deployed_model(spec, compact, expandnet)
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
