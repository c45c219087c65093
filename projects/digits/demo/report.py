"""The demo's report: the summary table, the verdicts, report.md and report.json."""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import shlex
from typing import Any

from .tasks import VARIANT_TITLES, VARIANTS


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
    cmd = 'python projects/digits/tools/demo.py ' + ' '.join(shlex.quote(a) for a in args.argv)
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


def summary_text(results: list[dict], args: argparse.Namespace, wall: float,
                 loads: tuple[str, str], report: str) -> str:
    """The one-screen summary that ends the demo's output.

    Args:
        results: Per-task results of :func:`~.runs.run_task`.
        args: Command-line arguments.
        wall: Wall time of the whole demo in seconds.
        loads: Load averages at the start and the end.
        report: The path of ``report.md``.

    Returns:
        The text, framed by two rules.
    """
    lines = ['', '=' * 100,
             'expand_mm demo -- deployed models (the ExpandNet row is its contracted '
             'checkpoint, evaluated with the compact config)']
    if args.quick:
        lines.append('--quick smoke test: tiny data, a few iterations; NUMBERS ARE MEANINGLESS')
    lines += ['', format_text_table(SUMMARY_HEADER, summary_rows(results)), '']
    lines += verdicts(results, args.quick)
    lines += ['', f'wall time {wall:.0f} s ({wall / 60:.1f} min), load average at start '
              f'{loads[0]}, at end {loads[1]}',
              f'report: {report}, {osp.join(args.work_dir, "report.png")}, ' + ', '.join(
                  r['predictions'] for r in results), '=' * 100]
    return '\n'.join(lines)
