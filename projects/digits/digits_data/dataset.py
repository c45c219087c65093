"""Both sets on request, each skipped when an identical one is already on disk."""
from __future__ import annotations

import json
from pathlib import Path

from .det import generate_det
from .seg import generate_seg
from .settings import GenSettings
from .writing import ProgressFn, default_workers, is_up_to_date, task_root


def generate(out: str | Path, task: str, settings: GenSettings,
             force: bool = False, progress: ProgressFn | None = None,
             workers: int | None = None) -> dict:
    """Generates the requested datasets, skipping up-to-date ones.

    Args:
        out: Output root.
        task: ``'det'``, ``'seg'`` or ``'both'``.
        settings: Generation settings.
        force: Regenerate even if an identical dataset exists.
        progress: Optional callback receiving progress lines.
        workers: Worker processes (``default_workers()`` if None); the
            output is identical for any value.

    Returns:
        ``{task: {'skipped': bool, 'summary': {...}}}`` for each task done.

    Raises:
        ValueError: If the settings or the task are invalid.
    """
    settings.validate()
    tasks = {'det': ['det'], 'seg': ['seg'], 'both': ['det', 'seg']}.get(task)
    if tasks is None:
        raise ValueError(f'unknown task {task!r}')
    workers = default_workers() if workers is None else workers
    writers = {'det': generate_det, 'seg': generate_seg}
    results = {}
    for t in tasks:
        if not force and is_up_to_date(out, t, settings):
            meta = json.loads((task_root(out, t) / 'meta.json').read_text())
            results[t] = dict(skipped=True, summary=meta['summary'])
        else:
            results[t] = dict(skipped=False, summary=writers[t](
                out, settings, progress=progress, workers=workers))
    return results
