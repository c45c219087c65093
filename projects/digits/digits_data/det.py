"""The detection set: canvases and COCO-format box annotations."""
from __future__ import annotations

from pathlib import Path

from .settings import CATEGORY_ID_OFFSET, CLASSES, GENERATOR_VERSION, GenSettings
from .writing import (ProgressFn, SplitSummary, check_disjoint, clean_outputs, render_split,
                      settings_meta, task_root, write_json)


def generate_det(out: str | Path, settings: GenSettings,
                 progress: ProgressFn | None = None,
                 workers: int = 1) -> dict:
    """Writes the COCO-format detection dataset.

    Category ids are 1..10 with names ``'0'``..``'9'`` in order, which mmdet's
    ``CocoDataset`` maps (by name) to labels 0..9 for
    ``metainfo=dict(classes=('0', ..., '9'))``. Boxes are tight around each
    digit's visible stroke pixels; ``area`` is the box area (``w * h``) so
    COCO's small/medium/large buckets follow the box size. Extra annotation
    fields ``source_index`` and ``visible_fraction`` are ignored by mmdet.

    Args:
        out: Output root; files go to ``out/digits_det``.
        settings: Generation settings (assumed valid).
        progress: Optional callback receiving progress lines.
        workers: Worker processes; the output does not depend on it.

    Returns:
        Per-split summary: images, objects, per-class counts, partly occluded
        objects and number of distinct source digits used.
    """
    root = task_root(out, 'det')
    clean_outputs(root, 'det')
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + CATEGORY_ID_OFFSET, name=name,
                       supercategory='digit')
                  for i, name in enumerate(CLASSES)]
    summaries = {}
    for split, n in (('train', settings.num_train), ('val', settings.num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        summary = summaries[split] = SplitSummary()
        coco_images, annotations = [], []
        for i, record in enumerate(render_split('det', split, n, settings,
                                                root, workers, progress)):
            summary.add(record)
            coco_images.append(dict(id=i + 1, file_name=f'{i:06d}.png',
                                    width=settings.img_size,
                                    height=settings.img_size))
            for label, source_index, bbox, visible in record['instances']:
                # ids start at 1: pycocotools' COCOeval treats id 0 as
                # "unmatched".
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1,
                    category_id=label + CATEGORY_ID_OFFSET, bbox=list(bbox),
                    area=float(bbox[2] * bbox[3]), iscrowd=0,
                    source_index=source_index,
                    visible_fraction=round(visible, 4)))
        coco = dict(
            info=dict(description='Handwritten digits (sklearn load_digits) '
                      f'on synthetic canvases, {split} split',
                      version=str(GENERATOR_VERSION)),
            licenses=[], images=coco_images, annotations=annotations,
            categories=categories)
        write_json(root / 'annotations' / f'instances_{split}.json', coco)
    check_disjoint(summaries)
    result = {s: v.as_dict() for s, v in summaries.items()}
    write_json(root / 'meta.json',
                dict(settings=settings_meta('det', settings), summary=result),
                indent=2)
    return result
