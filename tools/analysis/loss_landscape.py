"""Loss landscape of one or more configs along filter-normalised random directions.

    python tools/analysis/loss_landscape.py CONFIG [CONFIG ...]
        [--checkpoint CKPT ...] [--num-batches 4] [--steps-1d 21] [--steps-2d 11]
        [--span 1.0] [--form training|compact] [--no-2d] [--seed 0]
        [--metric] [--metric-samples 100] [--metric-key KEY]
        [--labels NAME ...] [--out DIR] [--cfg-options ...]

For every CONFIG the model is built as training would start it (MMEngine
``Runner.from_cfg``, ``init_weights()``), the checkpoint is loaded if given (an
ExpandNet config also takes a compact checkpoint), the first
``--num-batches`` batches of the train dataloader are preprocessed once and
kept, and the mean training loss over them is evaluated in eval mode (batch
norm on its running statistics) at ``θ + α d1`` (1-D, ``--steps-1d`` values
of α in ``[-span, span]``) and ``θ + α d1 + β d2`` (2-D, ``--steps-2d`` x
``--steps-2d``) for filter-normalised Gaussian directions ``d1``, ``d2``
seeded with ``--seed`` (Li et al. 2018; biases and norm parameters are not
moved). ``--form training`` (default) perturbs the trained parameters -- the
factors of an ExpandNet -- and ``--form compact`` its contraction. The
parameters are restored bit for bit afterwards.

``--metric`` also evaluates the config's own ``val_evaluator`` (mAP, mIoU)
on the first ``--metric-samples`` validation images at every point of the
1-D curve (``model.val_step`` and the evaluator, as the stock ``ValLoop``
does on that subset; a ``CocoMetric`` gets a COCO file of just those
images), and the 1-D plot draws it on a second axis.

Writes ``--out``/landscape.json, landscape_1d.png (the curves of all
configs) and landscape_2d_<label>.png (a contour plot per config), and prints
a table (loss at the centre, at the ends of the 1-D curve, and the 2-D range).
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import os.path as osp
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')  # headless: the tool only writes files

import numpy as np  # noqa: E402

import expand_mm  # noqa: E402,F401  (registers ExpandNet and the hooks)
from expand_mm.analysis import (loss_landscape_1d, loss_landscape_2d, mm_loss_fn,  # noqa: E402
                                mm_preprocess)
from expand_mm.analysis.metric import SubsetMetric  # noqa: E402
from expand_mm.analysis.runs import (build_run, check_run_files,  # noqa: E402
                                     resolve_runs, safe_name)
from expand_mm.cli import DefaultsHelpFormatter, run_tool  # noqa: E402
from expand_mm.surgery import expanded_layers  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402


def parse_args(argv: Sequence[str] | None = None, need_configs: bool = True
               ) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('config', nargs='*', help='config files (compact and/or ExpandNet)')
    parser.add_argument('--checkpoint', nargs='+', default=None,
                        help='one checkpoint per config (`none` for the initialisation); '
                        'without it every model is analysed at initialisation')
    parser.add_argument('--num-batches', type=int, default=4,
                        help='batches the loss is averaged over (fixed for every point)')
    parser.add_argument('--steps-1d', type=int, default=21,
                        help='points of the 1-D curve (odd: the centre is the trained point)')
    parser.add_argument('--steps-2d', type=int, default=11,
                        help='points per axis of the 2-D grid (odd)')
    parser.add_argument('--span', type=float, default=1.0,
                        help='coordinates run over [-span, span]')
    parser.add_argument('--form', choices=('training', 'compact'), default='training',
                        help='perturb the trained parameters (ExpandNet: the factors) or '
                        'the contracted compact weights')
    parser.add_argument('--no-2d', action='store_true', help='only the 1-D curve')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the initialisation, the data order and the directions')
    parser.add_argument('--metric', action='store_true',
                        help="also evaluate the config's val_evaluator (mAP, mIoU) at every "
                        'point of the 1-D curve')
    parser.add_argument('--metric-samples', type=int, default=100,
                        help='with --metric: the first N validation images')
    parser.add_argument('--metric-key', default=None,
                        help="with --metric: the evaluator's entry to report (default: its "
                        'bbox_mAP / mAP / mIoU)')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='names in the table and plots (default: config file stems)')
    parser.add_argument('--out', default=osp.join('work_dirs', 'analysis', 'loss_landscape'),
                        help='output directory (JSON, PNGs, runner logs)')
    parser.add_argument('--verbose', action='store_true',
                        help="show the runners' INFO logs (environment, config, "
                        'initialisation); by default only their warnings')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of every config')
    args = parser.parse_args(argv)
    if need_configs and not args.config:
        parser.error('give at least one CONFIG, before the options: --checkpoint and --labels '
                     'take every value that follows them')
    if args.num_batches < 1:
        parser.error('--num-batches must be >= 1')
    for key in ('steps_1d', 'steps_2d'):
        steps = getattr(args, key)
        # An even count puts no grid point at 0: the trained model itself is not on it.
        if steps < 3 or steps % 2 == 0:
            parser.error(f'--{key.replace("_", "-")} {steps}: give an odd count >= 3, so that '
                         'the grid has the trained point (coordinate 0) at its centre')
    if not args.span > 0:
        parser.error('--span must be > 0')
    if args.metric_samples < 1:
        parser.error('--metric-samples must be >= 1')
    return args


def analyse(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The 1-D (and 2-D) landscape of one config, JSON-friendly."""
    cfg, model, loader = build_run(run, args.cfg_options, args.seed, args.out, args.verbose)
    batches = mm_preprocess(model, loader, args.num_batches)
    loss_fn = mm_loss_fn(preprocess=False)
    label = run['label']

    def progress(done: int, total: int) -> None:
        if done == total or done % max(total // 4, 1) == 0:
            print(f'[{label}] {done}/{total} points', flush=True)

    common = dict(span=args.span, seed=args.seed, form=args.form, progress=progress)
    entry: dict[str, Any] = dict(
        label=label, config=run['config'] if isinstance(run['config'], str)
        else run['config'].filename,
        checkpoint=run['checkpoint'], expanded_layers=len(expanded_layers(model)),
        num_batches=len(batches), batch_size=cfg.train_dataloader.get('batch_size'))
    metric = SubsetMetric(cfg, args.metric_samples, osp.join(args.out, 'runs', safe_name(label)),
                          args.metric_key) if args.metric else None
    entry['1d'] = loss_landscape_1d(model, batches, loss_fn, steps=args.steps_1d,
                                    metric_fn=metric, **common).to_dict()
    entry['metric_key'] = metric.key if metric else None
    entry['2d'] = None if args.no_2d else loss_landscape_2d(
        model, batches, loss_fn, steps=args.steps_2d, **common).to_dict()
    del model, loader, batches
    gc.collect()
    return entry


def _fmt(v: Any) -> str:
    return 'n/a' if v is None else f'{v:.4g}'


def format_table(entries: list[dict[str, Any]]) -> str:
    """Centre loss, 1-D end points and 2-D range of every config as a text table."""
    header = ('config', 'form', 'params', 'batches', 'centre', 'L(-span)', 'L(+span)',
              '2-D min', '2-D max', 'metric at 0', 'metric at ±span')
    table = [header]
    for e in entries:
        one, two = e['1d'], e['2d']
        flat = [v for row in two['losses'] for v in row if v is not None] if two else []
        table.append((e['label'], one['form'], f'{one["num_params"]:,}',
                      str(one['num_batches']), _fmt(one['base_loss']),
                      _fmt(one['losses'][0]), _fmt(one['losses'][-1]),
                      _fmt(min(flat)) if flat else 'n/a', _fmt(max(flat)) if flat else 'n/a',
                      _fmt(one.get('center_metric')),
                      ' / '.join(_fmt(m) for m in (one['metrics'][0], one['metrics'][-1]))
                      if one.get('metrics') else 'n/a'))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def _array(values: list) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list)
                     else (np.nan if row is None else row) for row in values], dtype=float)


def plot_1d(entries: list[dict[str, Any]], path: str, title: str) -> None:
    """The 1-D curves of all configs in one plot (log-scaled loss when it spans 10x or more).

    With ``--metric`` the metric of each config is drawn dashed, in its
    colour, on a second y axis.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    metric_ax = ax.twinx() if any(e['1d'].get('metrics') for e in entries) else None
    all_values = []
    for i, e in enumerate(entries):
        one = e['1d']
        y = _array(one['losses'])
        all_values.append(y[np.isfinite(y)])
        ax.plot(one['x'], y, marker='.', color=f'C{i}', label=f'{e["label"]}: loss')
        if metric_ax is not None and one.get('metrics'):
            metric_ax.plot(one['x'], _array(one['metrics']), ls='--', marker='x', ms=4,
                           color=f'C{i}', label=f'{e["label"]}: {e["metric_key"]}')
    if metric_ax is not None:
        metric_ax.set_ylabel(' / '.join(sorted({e['metric_key'] for e in entries
                                                if e.get('metric_key')})) + ' (dashed)')
        metric_ax.legend(fontsize=7, loc='upper right')
    values = np.concatenate(all_values) if all_values else np.array([])
    if values.size and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale('log')
    ax.axvline(0, color='k', lw=0.6, ls=':')
    ax.set_xlabel('alpha (filter-normalised direction)')
    ax.set_ylabel('training loss')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_2d(entry: dict[str, Any], path: str, title: str) -> None:
    """Contour plot of one config's 2-D landscape (log10 of the loss when all positive)."""
    import matplotlib.pyplot as plt

    two = entry['2d']
    z = _array(two['losses'])
    finite = z[np.isfinite(z)]
    use_log = finite.size and finite.min() > 0
    if use_log:
        z = np.log10(z)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    contour = ax.contourf(two['x'], two['y'], z, levels=20, cmap='viridis')
    ax.contour(two['x'], two['y'], z, levels=20, colors='k', linewidths=0.3)
    fig.colorbar(contour, ax=ax, label='log10 loss' if use_log else 'loss')
    ax.plot([0], [0], marker='*', color='w', markersize=10)
    ax.set_xlabel('alpha (direction 1)')
    ax.set_ylabel('beta (direction 2)')
    ax.set_title(f'{entry["label"]}\n{title}', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None,
         configs: Sequence[str | Config] | None = None) -> list[dict[str, Any]]:
    """Run the tool; ``configs`` (paths or ``Config`` objects) replace the CONFIG arguments.

    Returns:
        One dict per config (the JSON entries).
    """
    args = parse_args(argv, need_configs=configs is None)
    runs = resolve_runs(list(configs) if configs is not None else args.config,
                        args.checkpoint, args.labels)
    check_run_files(runs, args.out)
    os.makedirs(args.out, exist_ok=True)
    entries = [analyse(run, args) for run in runs]
    print(f'\nLoss landscape, {args.form} form, eval-mode batch norm, seed {args.seed}')
    print(format_table(entries))
    json_path = osp.join(args.out, 'landscape.json')
    with open(json_path, 'w') as f:
        json.dump(dict(argv=sys.argv[1:] if argv is None else list(argv), form=args.form,
                       seed=args.seed, span=args.span, runs=entries), f, indent=1)
    title = (f'{args.form} form, {args.num_batches} batches, eval-mode BN, seed {args.seed}')
    written = [json_path, osp.join(args.out, 'landscape_1d.png')]
    plot_1d(entries, written[-1], title)
    for e in entries:
        if e['2d'] is not None:
            written.append(osp.join(args.out, f'landscape_2d_{safe_name(e["label"])}.png'))
            plot_2d(e, written[-1], title)
    print('wrote ' + ', '.join(written))
    stale = sorted(set(glob.glob(osp.join(glob.escape(args.out), 'landscape_2d_*.png')))
                   - set(written))
    if stale:  # left as they are: they may be wanted, but they are not this run's
        print(f'note: {len(stale)} older 2-D plot(s) in {args.out} are not from this run: '
              + ', '.join(osp.basename(p) for p in stale))
    return entries


if __name__ == '__main__':
    # A refused input (a mismatched checkpoint, a bad setting, a misspelled config
    # key) becomes one error line and exit code 2.
    sys.exit(run_tool(main))
