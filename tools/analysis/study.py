"""Run a grid of trainings (config x setting x seed) and tabulate the final metric.

    python tools/analysis/study.py STUDY.py --work-dir DIR [--jobs 1]
                                   [--report-only] [--dry-run]

``STUDY.py`` is an MMEngine config file (plain Python) with::

    configs = dict(compact='path/to/compact.py', expandnet='path/to/expandnet.py',
                   calibrated=dict(config='path/to/expandnet.py',   # a config with
                                   cfg_options={...}))              # its own settings
    axes = dict(                      # optional: axis -> level -> its settings
        schedule={'1x': dict(schedule_scale=1), '2x': dict(schedule_scale=2)},
        width={'0.5x': dict(per_config=dict(compact={...}, expandnet={...}))})
    seeds = [0, 1, 2]
    metric = 'coco/bbox_mAP'          # a key of the final validation
    metric_scale = 100                # optional: shown in percent
    cfg_options = {...}               # optional: applied to every run

A level's settings are ``--cfg-options`` style keys, plus ``schedule_scale``
(the whole schedule stretched, see :func:`expand_mm.schedule.scale_schedule`)
and ``per_config`` (keys for one config only). Every run is one call of
``tools/train.py`` (the stock MMEngine Runner) on a config written to
``DIR/runs/RUN/config.py``; its last validation is its score. For an
ExpandNet that validation runs the expanded model, which computes the
deployed compact model's function (the save hook checks the contraction at
every checkpoint). A finished run is recorded in ``DIR/results.jsonl`` and
never run again, so a killed study continues where it stopped (a run that
was cut off resumes from its last checkpoint). ``DIR/table.md`` (mean, spread
and each seed per cell) and ``DIR/figure.png`` are written after each run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from mmengine.config import Config

from expand_mm.cli import UsageError, require_file, run_tool
from expand_mm.errors import ConfigError, ExpandMMError
from expand_mm.schedule import scale_schedule

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
STUDY_KEYS = ('configs', 'axes', 'seeds', 'metric', 'metric_scale', 'cfg_options')
LEVEL_SPECIAL_KEYS = ('schedule_scale', 'per_config')


class StudyRunError(ExpandMMError, RuntimeError):
    """A training of the study failed; the message names its log."""


@dataclass(frozen=True)
class StudyRun:
    """One training of the grid.

    Args:
        config_name: Key of ``configs`` in the study file.
        levels: Axis name -> level name, in the study's axis order.
        seed: Training seed (``randomness.seed``).
    """
    config_name: str
    levels: tuple[tuple[str, str], ...]
    seed: int

    @property
    def cell(self) -> tuple[str, ...]:
        """The run's cell: its config and levels (every seed of a cell is pooled)."""
        return (self.config_name,) + tuple(level for _, level in self.levels)

    @property
    def run_id(self) -> str:
        """A file-name-safe unique name of the run."""
        parts = [self.config_name] + [f'{axis}-{level}' for axis, level in self.levels]
        return '_'.join(parts + [f'seed{self.seed}']).replace('/', '-').replace(' ', '')


@dataclass
class Study:
    """A study file, checked.

    Args:
        configs: Config name -> config path.
        config_options: Config name -> settings of that config entry.
        axes: Axis -> level -> settings.
        seeds: Seeds of every cell.
        metric: Key of the final validation metric.
        metric_scale: Factor applied to the metric in the table and figure.
        cfg_options: Settings applied to every run.
    """
    configs: dict[str, str]
    config_options: dict[str, dict] = field(default_factory=dict)
    axes: dict[str, dict[str, dict]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = ''
    metric_scale: float = 1.0
    cfg_options: dict = field(default_factory=dict)

    def runs(self) -> list[StudyRun]:
        """Every run of the grid: configs x levels of each axis x seeds."""
        axis_levels = [[(axis, level) for level in levels] for axis, levels in self.axes.items()]
        return [StudyRun(name, tuple(combo), seed)
                for name in self.configs
                for combo in itertools.product(*axis_levels)
                for seed in self.seeds]


def load_study(path: str) -> Study:
    """Read and check a study file.

    Raises:
        ConfigError: Naming the key that is missing or wrong, and what works.
    """
    require_file(path, 'study file')
    # Names starting with '_' are the file's own helpers (as in MMEngine configs).
    raw = {k: v for k, v in Config.fromfile(path).to_dict().items() if not k.startswith('_')}
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f'{path}: unknown key(s) {unknown}; a study file has {STUDY_KEYS}')
    configs, config_options = _config_entries(raw.get('configs'), path)
    if not isinstance(raw.get('metric'), str) or not raw['metric']:
        raise ConfigError(f"{path}: metric must name the validation metric, e.g. "
                          "'coco/bbox_mAP' or 'mIoU'")
    seeds = raw.get('seeds', [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f'{path}: seeds must be a non-empty list of integers, got {seeds!r}')
    axes = raw.get('axes') or {}
    for axis, levels in axes.items():
        if not isinstance(levels, dict) or not levels:
            raise ConfigError(f'{path}: axes.{axis} must be a non-empty dict level -> settings')
        for level, settings in levels.items():
            per_config = (settings or {}).get('per_config') or {}
            stray = sorted(set(per_config) - set(configs))
            if stray:
                raise ConfigError(f'{path}: axes.{axis}.{level}.per_config names {stray}, '
                                  f'which are not among configs {sorted(configs)}')
    return Study(configs=configs, config_options=config_options, axes=axes, seeds=list(seeds), metric=raw['metric'],
                 metric_scale=float(raw.get('metric_scale', 1.0)),
                 cfg_options=dict(raw.get('cfg_options') or {}))


def _config_entries(configs: Any, path: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Config paths and per-entry settings of a study file's ``configs``."""
    if not isinstance(configs, dict) or not configs:
        raise ConfigError(f'{path}: configs must be a non-empty dict name -> config path '
                          '(or dict(config=PATH, cfg_options={...}))')
    paths, options = {}, {}
    for name, entry in configs.items():
        if isinstance(entry, dict):
            if not isinstance(entry.get('config'), str) or set(entry) - {'config', 'cfg_options'}:
                raise ConfigError(f'{path}: configs.{name} must be a path or '
                                  f'dict(config=PATH, cfg_options={{...}}), got {entry!r}')
            paths[name], options[name] = entry['config'], dict(entry.get('cfg_options') or {})
        else:
            paths[name] = entry
        require_file(paths[name], f'config {name!r} of {path}')
    return paths, options


def run_config(study: Study, run: StudyRun, run_dir: str) -> Config:
    """The config of one run: its config file with the study's and its levels' settings."""
    cfg = Config.fromfile(study.configs[run.config_name])
    cfg.merge_from_dict(study.cfg_options)
    cfg.merge_from_dict(study.config_options.get(run.config_name, {}))
    for axis, level in run.levels:
        settings = dict(study.axes[axis][level] or {})
        per_config = (settings.pop('per_config', None) or {}).get(run.config_name) or {}
        factor = settings.pop('schedule_scale', None)
        cfg.merge_from_dict(settings)
        cfg.merge_from_dict(dict(per_config))
        if factor is not None:
            scale_schedule(cfg, factor)
    cfg.randomness = dict(cfg.get('randomness') or {}, seed=run.seed)
    cfg.work_dir = run_dir
    return cfg


def latest_scalars(run_dir: str) -> list[dict]:
    """The records of the newest ``vis_data/scalars.json`` under ``run_dir``.

    A resumed run writes a new timestamped log dir; validation records of the
    finished run are in the newest one.
    """
    found = []
    for stamp in os.listdir(run_dir) if osp.isdir(run_dir) else []:
        path = osp.join(run_dir, stamp, 'vis_data', 'scalars.json')
        if osp.isfile(path):
            found.append(path)
    if not found:
        return []
    with open(max(found, key=osp.getmtime)) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_metric(run_dir: str, metric: str) -> float:
    """The last logged value of ``metric`` in a finished run.

    Raises:
        StudyRunError: When the run logged no such value, naming the keys it has.
    """
    records = latest_scalars(run_dir)
    values = [r[metric] for r in records if metric in r]
    if not values:
        keys = sorted({k for r in records for k in r if '/' in k or k.lower().startswith('m')})
        raise StudyRunError(f'{run_dir}: no validation value of {metric!r} was logged '
                            f'(validation keys there: {keys or "none"}); is val_interval '
                            'within the schedule, and is metric the right key?')
    return float(values[-1])


def train_command(config_path: str, run_dir: str) -> list[str]:
    """``tools/train.py`` on the run's config, resuming when the run left a checkpoint."""
    command = [sys.executable, osp.join(REPO_ROOT, 'tools', 'train.py'), config_path,
               '--work-dir', run_dir]
    if osp.isfile(osp.join(run_dir, 'last_checkpoint')):
        command.append('--resume')
    return command


def write_run_config(study: Study, run: StudyRun, study_dir: str) -> str:
    """Write the run's config to ``DIR/runs/RUN/config.py`` and return that path."""
    run_dir = osp.join(study_dir, 'runs', run.run_id)
    os.makedirs(run_dir, exist_ok=True)
    config_path = osp.join(run_dir, 'config.py')
    run_config(study, run, run_dir).dump(config_path)
    return config_path


def execute_run(study: Study, run: StudyRun, config_path: str) -> dict[str, Any]:
    """Train one run from its written config and return its result record."""
    run_dir = osp.dirname(config_path)
    log_path = osp.join(run_dir, 'train.log')
    with open(log_path, 'a') as log:
        done = subprocess.run(train_command(config_path, run_dir), stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise StudyRunError(f'run {run.run_id} failed (exit {done.returncode}); see {log_path}')
    return dict(run_id=run.run_id, config=run.config_name, levels=dict(run.levels),
                seed=run.seed, metric=study.metric,
                value=final_metric(run_dir, study.metric))


def load_results(study_dir: str) -> dict[str, dict]:
    """Finished runs recorded in ``results.jsonl``, by run id."""
    path = osp.join(study_dir, 'results.jsonl')
    if not osp.isfile(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r['run_id']: r for r in records}


def summarize(study: Study, results: dict[str, dict]) -> list[dict]:
    """One row per cell with its finished seeds' values, mean and spread (sample std)."""
    rows: dict[tuple, dict] = {}
    for run in study.runs():
        row = rows.setdefault(run.cell, dict(cell=run.cell, values={}))
        if run.run_id in results:
            row['values'][run.seed] = results[run.run_id]['value'] * study.metric_scale
    for row in rows.values():
        values = list(row['values'].values())
        row['mean'] = statistics.fmean(values) if values else None
        row['std'] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
    return list(rows.values())


def format_table(study: Study, rows: list[dict]) -> str:
    """A markdown table: cell columns, n, mean ± spread, each seed."""
    header = ['config'] + list(study.axes) + ['n', f'{study.metric} mean ± std'] + [
        f'seed {s}' for s in study.seeds]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        score = '—' if row['mean'] is None else f'{row["mean"]:.2f} ± {row["std"]:.2f}'
        seeds = [f'{row["values"][s]:.2f}' if s in row['values'] else '—' for s in study.seeds]
        lines.append('| ' + ' | '.join(list(row['cell']) + [str(len(row['values'])), score]
                                        + seeds) + ' |')
    return '\n'.join(lines) + '\n'


def draw_figure(study: Study, rows: list[dict], path: str) -> None:
    """Mean ± spread per cell: the first axis along x, one line per other combination."""
    import matplotlib
    matplotlib.use('Agg')  # headless: the tool only writes files
    import matplotlib.pyplot as plt

    axes = list(study.axes)
    x_levels = list(study.axes[axes[0]]) if axes else ['']
    series: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        config, levels = row['cell'][0], row['cell'][1:]
        x = levels[0] if levels else ''
        series.setdefault((config,) + tuple(levels[1:]), {})[x] = row
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, by_x in series.items():
        xs = [i for i, level in enumerate(x_levels) if by_x.get(level, {}).get('mean') is not None]
        if not xs:
            continue
        means = [by_x[x_levels[i]]['mean'] for i in xs]
        stds = [by_x[x_levels[i]]['std'] for i in xs]
        ax.errorbar(xs, means, yerr=stds, marker='o', capsize=3, label=' / '.join(key))
    ax.set_xticks(range(len(x_levels)), x_levels)
    ax.set_xlabel(axes[0] if axes else '')
    ax.set_ylabel(f'{study.metric} (mean ± std over seeds)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(study: Study, study_dir: str) -> str:
    """Write ``table.md`` and ``figure.png`` from the finished runs; return the table."""
    rows = summarize(study, load_results(study_dir))
    table = format_table(study, rows)
    with open(osp.join(study_dir, 'table.md'), 'w') as f:
        f.write(table)
    draw_figure(study, rows, osp.join(study_dir, 'figure.png'))
    return table


def run_study(study: Study, study_dir: str, jobs: int = 1) -> list[str]:
    """Train every run not yet recorded; record each as it finishes.

    Returns:
        The ids of the runs trained by this call.
    """
    os.makedirs(study_dir, exist_ok=True)
    done = load_results(study_dir)
    # Seed by seed, so a study cut short has comparable cells.
    pending = sorted((run for run in study.runs() if run.run_id not in done),
                     key=lambda run: run.seed)
    # Every config is written before any training starts, in this thread: a bad
    # setting fails at once, and MMEngine's config loading (pkg_resources look-ups
    # of `mmdet::` bases) is not safe in several threads at once.
    config_paths = {run.run_id: write_run_config(study, run, study_dir) for run in pending}
    lock = threading.Lock()

    def one(run: StudyRun) -> str | None:
        try:
            record = execute_run(study, run, config_paths[run.run_id])
        except StudyRunError as err:
            print(err, flush=True)
            return None
        with lock:
            with open(osp.join(study_dir, 'results.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            write_report(study, study_dir)
        print(f'{run.run_id}: {study.metric} = {record["value"]:.4f}', flush=True)
        return run.run_id

    # A failed run does not stop the others; the study fails at the end, naming it.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        trained = list(pool.map(one, pending))
    failed = [run.run_id for run, done in zip(pending, trained) if done is None]
    if failed:
        raise StudyRunError(f'{len(failed)} run(s) failed: {", ".join(failed)} (each run\'s '
                            f'train.log under {osp.join(study_dir, "runs")} says why); the '
                            'others are recorded, and running the study again retries these')
    return [run_id for run_id in trained if run_id is not None]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('study', help='study file (configs, axes, seeds, metric)')
    parser.add_argument('--work-dir', required=True, help='where runs, results and table go')
    parser.add_argument('--jobs', type=int, default=1, help='trainings at once (default 1)')
    parser.add_argument('--report-only', action='store_true',
                        help='write table and figure from finished runs; train nothing')
    parser.add_argument('--dry-run', action='store_true',
                        help='list the runs still to train; train nothing')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    if args.jobs < 1:
        raise UsageError(f'--jobs {args.jobs}: give at least 1')
    study = load_study(args.study)
    if args.dry_run:
        done = load_results(args.work_dir)
        for run in study.runs():
            print(('done  ' if run.run_id in done else 'to do ') + run.run_id)
        return 0
    if not args.report_only:
        run_study(study, args.work_dir, args.jobs)
    os.makedirs(args.work_dir, exist_ok=True)
    print(write_report(study, args.work_dir), end='')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
