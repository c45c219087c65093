"""Logged scalars of several MMEngine work dirs, grouped into configs (seeds pooled).

MMEngine's ``LocalVisBackend`` writes every scalar of a run -- the losses
and learning rate at each logging step, validation metrics, and what hooks
add (``loss_l2``, ``gc/...``) -- as JSON lines ``{"key": value, ..., "step":
N}`` to ``<work_dir>/<timestamp>/vis_data/scalars.json``. :func:`load_run`
reads one run, :func:`group_runs` puts the seeds of one config together and
:func:`aggregate` gives a key's mean and spread over a group, step by step.
``tools/analysis/plot_curves.py`` draws them.
"""
from __future__ import annotations

import glob
import json
import os.path as osp
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, MissingFileError

SCALARS = osp.join('vis_data', 'scalars.json')
SPREADS = ('std', 'range')


@dataclass
class Run:
    """The scalars of one run.

    Attributes:
        work_dir: The work dir given.
        scalars_file: The ``scalars.json`` read.
        config: Stem of the config MMEngine dumped into the work dir (``None``
            when there is none, or several).
        scalars: ``key -> {step: value}`` (a key written twice at one step
            keeps the later value).
    """

    work_dir: str
    scalars_file: str
    config: str | None
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        """Whether the run logged ``key`` (every part of an ``a+b`` key)."""
        return all(part in self.scalars for part in key.split('+'))

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``key`` by step; a ``a+b`` key sums the steps both have."""
        parts = key.split('+')
        missing = [p for p in parts if p not in self.scalars]
        if missing:
            raise ConfigError(f'{self.work_dir}: no scalar {missing[0]!r} in {self.scalars_file} '
                              f'(it has {", ".join(sorted(self.scalars))})')
        steps = sorted(set.intersection(*[set(self.scalars[p]) for p in parts]))
        values = [sum(self.scalars[p][s] for p in parts) for s in steps]
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def find_scalars_file(work_dir: str) -> str:
    """The ``scalars.json`` of ``work_dir``: of its latest ``<timestamp>`` run that has one.

    ``work_dir`` may also be a run's own folder (``<work_dir>/<timestamp>``) or
    the file itself.

    Raises:
        MissingFileError: Naming ``work_dir`` when it holds no non-empty
            ``scalars.json``.
    """
    if osp.isfile(work_dir) and work_dir.endswith('.json'):
        candidates = [work_dir]
    else:
        candidates = [osp.join(work_dir, SCALARS)] + sorted(
            glob.glob(osp.join(work_dir, '*', SCALARS)), reverse=True)
    for path in candidates:
        if osp.isfile(path) and osp.getsize(path) > 0:
            return path
    raise MissingFileError(f'{work_dir}: no scalars (no non-empty <timestamp>/{SCALARS} under '
                           'it); give the work dir of a run that logged at least once')


def dumped_config(work_dir: str) -> str | None:
    """Stem of the one ``*.py`` config MMEngine dumped into ``work_dir``, else ``None``."""
    configs = glob.glob(osp.join(work_dir, '*.py'))
    return osp.splitext(osp.basename(configs[0]))[0] if len(configs) == 1 else None


def load_run(work_dir: str) -> Run:
    """Read the scalars of one run (see :func:`find_scalars_file`)."""
    path = find_scalars_file(work_dir)
    scalars: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f'{path}:{number}: not a JSON line ({err})') from err
            step = record.pop('step', None)
            if step is None:
                continue
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    scalars.setdefault(key, {})[int(step)] = float(value)
    return Run(work_dir=work_dir, scalars_file=path, config=dumped_config(work_dir),
               scalars=scalars)


def group_name(run: Run, pattern: str | None = None) -> str:
    """The group of ``run``: ``pattern``'s match on the work dir, else its config name.

    Args:
        run: A loaded run.
        pattern: A regular expression searched in the work dir path; its
            first group (or the whole match without a group) names the group.
            ``None``: the dumped config's name, else the work dir's name.

    Raises:
        ConfigError: If ``pattern`` does not match the work dir.
    """
    if pattern is None:
        return run.config or osp.basename(osp.normpath(run.work_dir))
    match = re.search(pattern, run.work_dir)
    if match is None:
        raise ConfigError(f'--group {pattern!r} does not match the work dir {run.work_dir!r}')
    return match.group(1) if match.groups() else match.group(0)


def group_runs(runs: list[Run], pattern: str | None = None) -> dict[str, list[Run]]:
    """``group name -> runs``, groups in the order of their first run."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_name(run, pattern), []).append(run)
    return groups


def aggregate(runs: list[Run], key: str, spread: str = 'std'
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``key`` over ``runs`` and its spread, at the steps every run logged.

    Args:
        runs: The runs of one group (seeds).
        key: A scalar name, or ``a+b`` for a sum of scalars.
        spread: ``'std'``: mean ± standard deviation over runs (``ddof=0``);
            ``'range'``: the lowest and highest run.

    Returns:
        ``(steps, mean, low, high)``.
    """
    if spread not in SPREADS:
        raise ConfigError(f'spread={spread!r} must be one of {SPREADS}')
    series = [run.series(key) for run in runs]
    steps = sorted(set.intersection(*[set(s.tolist()) for s, _ in series]))
    values = np.stack([np.asarray([dict(zip(s.tolist(), v))[t] for t in steps])
                       for s, v in series]) if steps else np.zeros((len(runs), 0))
    mean = values.mean(0)
    if spread == 'std':
        std = values.std(0)
        return np.asarray(steps), mean, mean - std, mean + std
    return np.asarray(steps), mean, values.min(0), values.max(0)
