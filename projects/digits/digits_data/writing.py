"""What both dataset writers share: where files go, when a set is up to date, parallel rendering."""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from .render import EDGE_BAND, STROKE_THRESHOLD, render_canvas
from .settings import CLASSES, GENERATOR_VERSION, GenSettings
from .sources import VAL_SOURCE_FRACTION, canvas_rng, load_source_digits, split_sources

ProgressFn = Callable[[str], None]


def settings_meta(task: str, settings: GenSettings) -> dict:
    """Returns the record that identifies a generated dataset.

    Args:
        task: ``'det'`` or ``'seg'``.
        settings: Generation settings.

    Returns:
        A JSON-serialisable dict; equal dicts mean identical files.
    """
    return dict(task=task, generator_version=GENERATOR_VERSION,
                val_source_fraction=VAL_SOURCE_FRACTION,
                stroke_threshold=STROKE_THRESHOLD, edge_band=EDGE_BAND,
                **asdict(settings))


def task_root(out: str | Path, task: str) -> Path:
    """Returns the dataset folder of a task under the output root.

    Args:
        out: Output root (``--out``).
        task: ``'det'`` or ``'seg'``.

    Returns:
        ``out/digits_det`` or ``out/digits_seg``.
    """
    return Path(out) / f'digits_{task}'


def _image_dirs(root: Path, task: str) -> list[tuple[str, Path]]:
    if task == 'det':
        return [(s, root / s) for s in ('train', 'val')]
    return [(s, root / d / s) for s in ('train', 'val')
            for d in ('img_dir', 'ann_dir')]


def is_up_to_date(out: str | Path, task: str, settings: GenSettings) -> bool:
    """Tells whether a complete dataset with these settings already exists.

    ``meta.json`` is written last, so an interrupted run never looks
    complete; the image counts are checked too in case files were deleted.

    Args:
        out: Output root.
        task: ``'det'`` or ``'seg'``.
        settings: Generation settings.

    Returns:
        True if generation can be skipped.
    """
    root = task_root(out, task)
    meta_path = root / 'meta.json'
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get('settings') != settings_meta(task, settings):
        return False
    wanted = {'train': settings.num_train, 'val': settings.num_val}
    for split, folder in _image_dirs(root, task):
        if not folder.is_dir() or \
                sum(1 for _ in folder.glob('*.png')) != wanted[split]:
            return False
    if task == 'det':
        return all((root / 'annotations' / f'instances_{s}.json').is_file()
                   for s in wanted)
    return all((root / f'sources_{s}.json').is_file() for s in wanted)


def clean_outputs(root: Path, task: str) -> None:
    """Removes what a previous run of this task wrote under ``root``.

    Only the generator's own outputs go, never the whole folder, in case a
    user keeps something else next to them.

    Args:
        root: The task's dataset folder (:func:`task_root`).
        task: ``'det'`` or ``'seg'``.
    """
    names = (['train', 'val', 'annotations'] if task == 'det' else
             ['img_dir', 'ann_dir', 'sources_train.json', 'sources_val.json'])
    for name in ['meta.json'] + names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json(path: Path, obj: dict, indent: int | None = None) -> None:
    """Writes ``obj`` as JSON: compact without ``indent``, one trailing newline.

    Args:
        path: Output file.
        obj: JSON-serialisable object.
        indent: Indentation for a human-readable file (``meta.json``).
    """
    separators = None if indent else (',', ':')
    path.write_text(json.dumps(obj, indent=indent, separators=separators) +
                    '\n')


def save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    """Writes an image or a label map as PNG, byte-identical for identical arrays.

    Args:
        array: ``(H, W, 3)`` or ``(H, W)`` uint8 array.
        path: Output file.
        compress_level: zlib level of the PNG encoder.
    """
    # Fixed encoder settings and no metadata chunks keep files byte-identical.
    # The noisy RGB canvases barely compress: level 1 encodes ~35% faster than
    # the default for ~9% larger files; label maps compress well at level 6.
    Image.fromarray(array).save(path, format='PNG',
                                compress_level=compress_level)


@functools.lru_cache(maxsize=4)
def _sources_and_pools(seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    # Cached so that each worker process loads the digits once.
    images, labels = load_source_digits()
    pools = dict(zip(('train', 'val'), split_sources(labels, seed)))
    return images, labels, pools


def _produce(job: tuple[str, str, int, GenSettings, str]) -> dict:
    """Renders and saves one canvas; runs in worker processes.

    Args:
        job: ``(task, split, index, settings, task_root)``.

    Returns:
        A small picklable record of what was drawn.
    """
    task, split, index, settings, root = job
    images, labels, pools = _sources_and_pools(settings.seed)
    canvas = render_canvas(canvas_rng(settings.seed, task, split, index),
                           settings, images, labels, pools[split])
    stem = f'{index:06d}'
    root = Path(root)
    record = dict(instances=[
        (inst.label, inst.source_index, inst.bbox, inst.visible_fraction)
        for inst in canvas.instances
    ])
    if task == 'det':
        save_png(canvas.image, root / split / f'{stem}.png', 1)
    else:
        save_png(canvas.image, root / 'img_dir' / split / f'{stem}.png', 1)
        save_png(canvas.label_map, root / 'ann_dir' / split / f'{stem}.png', 6)
        record['pixels'] = np.bincount(canvas.label_map.ravel(), minlength=256)
    return record


def default_workers() -> int:
    """Returns the number of worker processes used by default.

    Returns:
        The CPUs available to this process, capped at 8.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def render_split(task: str, split: str, n: int, settings: GenSettings,
                 root: Path, workers: int,
                 progress: ProgressFn | None) -> Iterator[dict]:
    """Renders and saves the ``n`` canvases of one split, in index order.

    Args:
        task: ``'det'`` or ``'seg'``.
        split: ``'train'`` or ``'val'``.
        n: Canvases in the split.
        settings: Generation settings.
        root: The task's dataset folder.
        workers: Worker processes; the files do not depend on it.
        progress: Optional callback receiving progress lines.

    Yields:
        The record of each canvas (what was drawn), in index order.
    """
    # Every canvas has its own random stream, so the output does not depend on
    # the number of workers; imap keeps the records in index order.
    jobs = ((task, split, i, settings, str(root)) for i in range(n))
    if workers <= 1:
        records = map(_produce, jobs)
        pool = None
    else:
        # fork shares the loaded modules and the cached source digits, so a
        # worker starts at once.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context(
            'fork' if 'fork' in methods else None)
        pool = ctx.Pool(workers)
        records = pool.imap(_produce, jobs, chunksize=16)
    try:
        for i, record in enumerate(records):
            yield record
            if progress is not None and ((i + 1) % 500 == 0 or i + 1 == n):
                progress(f'  {task} {split}: {i + 1}/{n} images')
    finally:
        if pool is not None:
            pool.close()
            pool.join()


class SplitSummary:
    """Accumulates per-split statistics from canvas records."""

    def __init__(self) -> None:
        self.images = 0
        self.objects = 0
        self.occluded = 0
        self.per_class = {c: 0 for c in CLASSES}
        self.sources: set[int] = set()

    def add(self, record: dict) -> None:
        """Counts one canvas record.

        Args:
            record: A record yielded by :func:`render_split`.
        """
        self.images += 1
        for label, source_index, _, visible_fraction in record['instances']:
            self.objects += 1
            self.per_class[CLASSES[label]] += 1
            self.occluded += int(visible_fraction < 1.0)
            self.sources.add(source_index)

    def as_dict(self) -> dict:
        """Returns the JSON-serialisable summary."""
        return dict(images=self.images, objects=self.objects,
                    occluded=self.occluded, per_class=dict(self.per_class),
                    sources_used=len(self.sources))


def check_disjoint(summaries: dict[str, SplitSummary]) -> None:
    """Asserts that no source digit was drawn in both splits.

    Args:
        summaries: ``'train'`` and ``'val'`` summaries.
    """
    shared = summaries['train'].sources & summaries['val'].sources
    assert not shared, f'source digits used in both splits: {sorted(shared)}'
