"""The segmentation set: canvases and label maps in mmseg's folder format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .settings import IGNORE_INDEX, SEG_CLASSES, GenSettings
from .writing import (ProgressFn, SplitSummary, check_disjoint, clean_outputs, render_split,
                      settings_meta, task_root, write_json)


def generate_seg(out: str | Path, settings: GenSettings,
                 progress: ProgressFn | None = None,
                 workers: int = 1) -> dict:
    """Writes the mmseg folder-format segmentation dataset.

    Label maps are single-channel uint8 PNGs with the same stem as their
    image: 0 background, digit + 1 on stroke pixels, ``IGNORE_INDEX`` on the
    thin blended edge band. ``sources_{split}.json`` lists, per image stem,
    the ``[source_index, digit]`` pairs drawn on it.

    Args:
        out: Output root; files go to ``out/digits_seg``.
        settings: Generation settings (assumed valid).
        progress: Optional callback receiving progress lines.
        workers: Worker processes; the output does not depend on it.

    Returns:
        Per-split summary as for ``generate_det`` plus pixel counts per
        label (``pixels``, keyed by class name and ``'ignore'``).
    """
    root = task_root(out, 'seg')
    clean_outputs(root, 'seg')
    names = dict(enumerate(SEG_CLASSES)) | {IGNORE_INDEX: 'ignore'}
    summaries, pixels = {}, {}
    for split, n in (('train', settings.num_train), ('val', settings.num_val)):
        (root / 'img_dir' / split).mkdir(parents=True, exist_ok=True)
        (root / 'ann_dir' / split).mkdir(parents=True, exist_ok=True)
        summary = summaries[split] = SplitSummary()
        sources = {}
        counts = np.zeros(256, np.int64)
        for i, record in enumerate(render_split('seg', split, n, settings,
                                                root, workers, progress)):
            summary.add(record)
            sources[f'{i:06d}'] = [[label, src] for label, src, _, _ in
                                   record['instances']]
            counts += record['pixels']
        pixels[split] = {names[k]: int(counts[k]) for k in sorted(names)}
        write_json(root / f'sources_{split}.json', sources)
    check_disjoint(summaries)
    result = {s: v.as_dict() | dict(pixels=pixels[s])
              for s, v in summaries.items()}
    write_json(root / 'meta.json',
                dict(settings=settings_meta('seg', settings), summary=result),
                indent=2)
    return result
