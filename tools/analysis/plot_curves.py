"""Draw logged scalars of several work dirs, seeds of one config as mean ± spread.

    python tools/analysis/plot_curves.py WORK_DIR [WORK_DIR ...]
        [--keys loss] [--group REGEX] [--spread std|range] [--log]
        [--legend NAME ...] [--title TITLE] [--out curves.png] [--dpi 100]

The shape of mmdet's ``tools/analysis_tools/analyze_logs.py plot_curve``, on
MMEngine's ``<work_dir>/<timestamp>/vis_data/scalars.json`` (the latest
timestamp that has one): any scalar a run wrote -- ``loss`` and its parts,
``lr``, the validation metric (``coco/bbox_mAP``, ``mIoU``), ``loss_l2`` of
``WeightDecayTermHook``, ``gc/<space>/min_cos`` ... of
``GradientConfusionHook``; ``a+b`` draws a sum (``loss+loss_l2``: the total
objective). One panel per key. Work dirs are grouped by the config MMEngine
dumped into them (the seeds of one config), or by ``--group``'s first
regex group on the path; a group is drawn as its mean over runs at the steps
every run logged, with a band of ± one standard deviation (``--spread
range``: lowest to highest run) and each run faint behind it. The last
point of every group and key is printed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # headless: the tool only writes files

import matplotlib.pyplot as plt  # noqa: E402

from expand_mm.analysis.curves import (SPREADS, aggregate, group_runs,  # noqa: E402
                                       load_run)
from expand_mm.cli import DefaultsHelpFormatter, run_tool  # noqa: E402
from expand_mm.errors import UsageError  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument('work_dirs', nargs='+', help='work dirs of the runs (or their '
                        '<timestamp> folders, or scalars.json files)')
    parser.add_argument('--keys', nargs='+', default=['loss'],
                        help='scalars to draw, one panel each; a+b draws their sum')
    parser.add_argument('--group', default=None,
                        help='regex on the work dir path whose first group names the group '
                        '(default: the config dumped in the work dir)')
    parser.add_argument('--spread', choices=SPREADS, default='std',
                        help='band around the mean: one standard deviation, or min to max')
    parser.add_argument('--log', action='store_true', help='log-scale y axes')
    parser.add_argument('--legend', nargs='+', default=None,
                        help='a name per group, in the order of their first work dir')
    parser.add_argument('--title', default=None, help='title of the figure')
    parser.add_argument('--xlabel', default='iteration', help='label of the step axis')
    parser.add_argument('--out', default='curves.png', help='image file written')
    parser.add_argument('--dpi', type=int, default=100, help='resolution of --out')
    return parser.parse_args(argv)


def refuse_unknown_key(groups: dict, key: str) -> None:
    """Raise naming ``key`` and one run's scalars when no run logged it (a misspelt key)."""
    runs = [run for group in groups.values() for run in group]
    if not any(run.has(key) for run in runs):
        runs[0].series(key)  # raises, naming the run and the scalars it has


def plot_curve(groups: dict, args: argparse.Namespace) -> plt.Figure:
    """One panel per key: each group's mean, its spread band and its runs faint behind."""
    names = args.legend or list(groups)
    if len(names) != len(groups):
        raise UsageError(f'--legend: got {len(names)} names for {len(groups)} groups '
                         f'({", ".join(groups)})')
    fig, axes = plt.subplots(len(args.keys), 1, figsize=(7, 2.6 * len(args.keys) + 0.4),
                             sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], args.keys):
        refuse_unknown_key(groups, key)
        for i, (name, (group, runs)) in enumerate(zip(names, groups.items())):
            colour = f'C{i}'
            if not any(run.has(key) for run in runs):
                print(f'{key:<28} {name:<48} not logged by this group: left out of the panel')
                continue
            for run in runs:
                steps, values = run.series(key)
                ax.plot(steps, values, color=colour, alpha=0.2, lw=0.7)
            steps, mean, low, high = aggregate(runs, key, args.spread)
            ax.fill_between(steps, low, high, color=colour, alpha=0.25, lw=0)
            ax.plot(steps, mean, color=colour, lw=1.5, marker='o' if len(steps) < 25 else None,
                    ms=3, label=f'{name} (n={len(runs)})')
            if len(steps):
                print(f'{key:<28} {name:<48} step {steps[-1]:>6}: {mean[-1]:.5g} '
                      f'[{low[-1]:.5g}, {high[-1]:.5g}] over {len(runs)} run(s)')
        ax.set_ylabel(key, fontsize=8)
        if args.log:
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel(args.xlabel)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    # Room at the top for the title, which tight_layout does not reserve.
    fig.tight_layout(rect=(0, 0, 1, 0.97 if args.title else 1))
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the tool; returns the groups (``name -> runs``)."""
    args = parse_args(argv)
    runs = [load_run(work_dir) for work_dir in args.work_dirs]
    groups = group_runs(runs, args.group)
    fig = plot_curve(groups, args)
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f'save curve to: {args.out}')
    return groups


if __name__ == '__main__':
    sys.exit(run_tool(main))
