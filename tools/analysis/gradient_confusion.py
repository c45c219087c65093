"""Gradient confusion of one or more configs, e.g. a compact model vs its ExpandNet.

    python tools/analysis/gradient_confusion.py CONFIG [CONFIG ...]
        [--checkpoint CKPT[,CKPT ...] ...] [--num-batches 32] [--space training|compact]
        [--bn train|eval] [--seed 0] [--labels NAME ...] [--store-dir DIR]
        [--out DIR] [--cfg-options ...]

For every CONFIG the model is built as training would start it (MMEngine
``Runner.from_cfg``, ``init_weights()``), the checkpoint is loaded if one is
given (an ExpandNet config takes its own training checkpoint or a compact one,
factorised exactly), and the gradient of the training loss of each of the
first ``--num-batches`` batches of the config's train dataloader is taken at
those parameters (no update). All configs see the same batches in the same
order when they share the data (the loader is seeded with ``--seed``).

``--space training`` differentiates w.r.t. the trained parameters (the
factors of an ExpandNet), ``--space compact`` w.r.t. the effective compact
weights (every expanded layer contracted), the space a compact model and its
ExpandNet share. ``--bn train`` (default) is a training step's batch norm,
``--bn eval`` uses the running statistics.

A config may be given the checkpoints of several trainings (seeds),
comma-separated: each is analysed on the same batches, and the config's
statistics are then their mean ± standard deviation over runs, its density
the kernel density of the cosines of every run pooled (each run's own
density drawn faintly behind it), as the ExpandNets paper draws its
densities over 5 runs.

Prints one row per run (pairs, mean / median / min cosine similarity,
fraction of negative pairs, gradient confusion eta = max(0, max -<g_i, g_j>)),
then one row per config of several runs (mean ± std), and writes
``--out``/gradient_confusion.json and gradient_confusion.png (the
cosine-similarity densities of all configs overlaid).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import os.path as osp
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')  # headless: the tool only writes files

import numpy as np  # noqa: E402
import torch  # noqa: E402

import expand_mm  # noqa: E402,F401  (registers ExpandNet and the hooks)
from expand_mm.analysis import gradient_confusion, mm_loss_fn  # noqa: E402
from expand_mm.analysis.gradient_confusion import cosine_density  # noqa: E402
from expand_mm.cli import DefaultsHelpFormatter, run_tool  # noqa: E402
from expand_mm.analysis.runs import (build_run, check_run_files,  # noqa: E402
                                     resolve_runs, split_seed_runs)
from expand_mm.surgery import count_params, expanded_layers  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

# The statistics given as mean ± std over the runs of one config.
GROUP_STATISTICS = ('mean_cos', 'median_cos', 'frac_negative', 'min_cos', 'eta',
                    'mean_grad_norm', 'mean_loss')
COLUMNS = ('config', 'space', 'params', 'batches', 'pairs', 'mean cos', 'median cos',
           'neg frac', 'min cos', 'eta', 'mean |g|', 'mean loss')


def parse_args(argv: Sequence[str] | None = None, need_configs: bool = True
               ) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('config', nargs='*', help='config files (compact and/or ExpandNet)')
    parser.add_argument('--checkpoint', nargs='+', default=None,
                        help='one entry per config (`none` for the initialisation): a '
                        'checkpoint, or several comma-separated (seeds: pooled); without it '
                        'every model is analysed at initialisation')
    parser.add_argument('--num-batches', type=int, default=32,
                        help='mini-batches (gradients); pairs = N (N - 1) / 2')
    parser.add_argument('--space', choices=('training', 'compact'), default='training',
                        help='differentiate w.r.t. the trained parameters or the effective '
                        'compact weights')
    parser.add_argument('--bn', choices=('train', 'eval'), default='train',
                        help='batch norm on batch statistics (train) or running ones (eval)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the initialisation and of the data order')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='names in the table and plot (default: config file stems)')
    parser.add_argument('--store-dir', default=None,
                        help='keep the gradient vectors in .npy files there instead of '
                        'memory (N x params x 4 bytes)')
    parser.add_argument('--out', default=osp.join('work_dirs', 'analysis',
                                                  'gradient_confusion'),
                        help='output directory (JSON, PNG, runner logs)')
    parser.add_argument('--verbose', action='store_true',
                        help="show the runners' INFO logs (environment, config, "
                        'initialisation); by default only their warnings')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of every config, e.g. '
                        'train_dataloader.batch_size=8')
    args = parser.parse_args(argv)
    if need_configs and not args.config:
        parser.error('give at least one CONFIG, before the options: --checkpoint and --labels '
                     'take every value that follows them')
    if args.num_batches < 2:
        parser.error(f'--num-batches {args.num_batches}: pairs need at least 2 batches')
    return args


def analyse(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Gradient confusion of one config; the result's ``to_dict()`` plus the run's settings."""
    cfg, model, loader = build_run(run, args.cfg_options, args.seed, args.out, args.verbose)
    torch.manual_seed(args.seed)  # dropout and the like

    def progress(index: int, loss: float) -> None:
        if (index + 1) % 8 == 0 or index + 1 == args.num_batches:
            print(f'[{run["label"]}] batch {index + 1}/{args.num_batches}: loss {loss:.4f}',
                  flush=True)

    result = gradient_confusion(model, loader, mm_loss_fn(), num_batches=args.num_batches,
                                space=args.space, bn=args.bn, store_dir=args.store_dir,
                                progress=progress)
    result.meta = dict(label=run['label'], group=run['group'],
                       config=run['config'] if isinstance(run['config'], str)
                       else run['config'].filename,
                       checkpoint=run['checkpoint'], seed=args.seed,
                       expanded_layers=len(expanded_layers(model)),
                       training_params=count_params(model),
                       batch_size=cfg.train_dataloader.get('batch_size'))
    out = result.to_dict()
    out['_result'] = result
    del model, loader
    gc.collect()
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary of every config as an aligned text table."""
    def num(v: Any, fmt: str) -> str:
        return 'n/a' if v is None else format(v, fmt)

    table = [COLUMNS]
    for r in rows:
        s = r['summary']
        table.append((r['meta']['label'], r['space'], f'{s["num_params"]:,}',
                      str(s['num_batches']), str(s['num_pairs']), num(s['mean_cos'], '.4f'),
                      num(s['median_cos'], '.4f'), num(s['frac_negative'], '.3f'),
                      num(s['min_cos'], '.4f'), num(s['eta'], '.4g'),
                      num(s['mean_grad_norm'], '.4g'), num(s['mean_loss'], '.4f')))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def group_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``config label -> its runs' rows``, in the order of the first run of each."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row['meta']['group'], []).append(row)
    return groups


def group_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (over runs, ``ddof=0``) of each statistic, the pooled cosines' too."""
    summary: dict[str, Any] = dict(num_runs=len(rows))
    for key in GROUP_STATISTICS:
        values = np.asarray([np.nan if r['summary'][key] is None else r['summary'][key]
                             for r in rows], dtype=np.float64)
        summary[key] = dict(mean=float(np.nanmean(values)), std=float(np.nanstd(values)))
    pooled = np.concatenate([r['_result'].cosines for r in rows])
    pooled = pooled[np.isfinite(pooled)]
    summary['pooled'] = dict(num_pairs=int(pooled.size), mean_cos=float(pooled.mean()),
                             frac_negative=float(np.mean(pooled < 0)),
                             min_cos=float(pooled.min()))
    return summary


def format_group_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Mean ± std over runs of the configs given several checkpoints."""
    lines = []
    for label, rows in groups.items():
        if len(rows) < 2:
            continue
        s = group_summary(rows)
        lines.append(f'{label} ({s["num_runs"]} runs): ' + ', '.join(
            f'{key} {s[key]["mean"]:.4g} ± {s[key]["std"]:.2g}'
            for key in ('mean_cos', 'frac_negative', 'min_cos', 'eta')))
    return '\n'.join(lines)


def plot_densities(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Overlay the cosine-similarity density (and a light histogram) of every config.

    A config of several runs is drawn as the density of all its runs' cosines
    pooled, each run's own density faint behind it. The densities are those
    of :func:`~expand_mm.analysis.gradient_confusion.cosine_density` (over
    ``[-1, 1]``); the x axis shows the range the cosines occupy.
    """
    import matplotlib.pyplot as plt

    # Zoom on the cosines (they often crowd a narrow band), never beyond [-1, 1].
    cosines = [r['_result'].cosines for r in rows]
    cosines = np.concatenate([c[np.isfinite(c)] for c in cosines])
    low, high = (cosines.min(), cosines.max()) if cosines.size else (-1.0, 1.0)
    margin = max(0.1 * (high - low), 0.02)
    low, high = max(low - margin, -1.0), min(high + margin, 1.0)
    grid = np.linspace(low, high, 401)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, runs) in enumerate(group_rows(rows).items()):
        colour = f'C{i}'
        pooled = np.concatenate([r['_result'].cosines for r in runs])
        pooled = pooled[np.isfinite(pooled)]
        density, edges = np.histogram(pooled, bins=40, range=(low, high),
                                      density=bool(pooled.size))
        ax.stairs(density, edges, color=colour, alpha=0.25 if len(runs) == 1 else 0.12,
                  fill=True)
        if len(runs) > 1:
            for run in runs:
                ax.plot(grid, run['_result'].density(grid), color=colour, lw=0.7, alpha=0.35)
        n = f'{len(runs)} runs, ' if len(runs) > 1 else ''
        ax.plot(grid, cosine_density(pooled, grid), color=colour, lw=1.8,
                label=f'{label} ({n}mean {pooled.mean():.3f}, '
                      f'neg {np.mean(pooled < 0):.2f})')
    if low < 0 < high:
        ax.axvline(0, color='k', lw=0.6, ls=':')
    ax.set_xlim(low, high)
    ax.set_xlabel('cosine similarity of mini-batch gradients')
    ax.set_ylabel('density')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc='upper left')
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
    runs = split_seed_runs(resolve_runs(list(configs) if configs is not None else args.config,
                                        args.checkpoint, args.labels))
    check_run_files(runs, args.out)
    os.makedirs(args.out, exist_ok=True)
    rows = [analyse(run, args) for run in runs]
    print(f'\nGradient confusion, {args.space} space, batch norm {args.bn}, seed {args.seed}')
    print(format_table(rows))
    groups = group_rows(rows)
    if any(len(g) > 1 for g in groups.values()):
        print(format_group_table(groups))
    json_path = osp.join(args.out, 'gradient_confusion.json')
    png_path = osp.join(args.out, 'gradient_confusion.png')
    entries = [{k: v for k, v in r.items() if k != '_result'} for r in rows]
    with open(json_path, 'w') as f:
        json.dump(dict(argv=sys.argv[1:] if argv is None else list(argv),
                       space=args.space, bn=args.bn, seed=args.seed,
                       num_batches=args.num_batches, runs=entries,
                       configs={label: group_summary(g) for label, g in groups.items()}),
                  f, indent=1)
    plot_densities(rows, png_path, f'gradient cosine similarity, {args.space} space, '
                   f'BN {args.bn}, {args.num_batches} batches, seed {args.seed}')
    print(f'wrote {json_path} and {png_path}')
    return entries


if __name__ == '__main__':
    # A refused input (a mismatched checkpoint, a bad setting, a misspelled config
    # key) becomes one error line and exit code 2.
    sys.exit(run_tool(main))
