"""A config's own validation metric (mAP, mIoU) on a fixed subset, as ``metric(model)``.

The loss landscape evaluates the training loss at every point; the ExpandNets
paper draws the error next to it. :class:`SubsetMetric` turns an
MMEngine config into ``metric(model) -> float``: the first
``num_samples`` images of the config's ``val_dataloader`` (loaded once, then
kept), run through ``model.val_step`` and scored by the config's
``val_evaluator`` -- what the stock ``ValLoop`` does on that subset.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import os.path as osp
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

# Keys preferred as "the" metric, in this order (suffix match): detection, then segmentation.
PREFERRED_KEYS = ('bbox_mAP', 'mAP', 'mIoU')


def pick_metric_key(metrics: dict[str, Any], key: str | None = None) -> str:
    """``key`` if given, else the first of :data:`PREFERRED_KEYS` the metrics have, else the first.

    Raises:
        ConfigError: If ``key`` is not among the metrics, naming those there are.
    """
    if key is not None:
        if key not in metrics:
            raise ConfigError(f'--metric-key {key!r}: the evaluator gives '
                              f'{", ".join(metrics)}')
        return key
    for suffix in PREFERRED_KEYS:
        for name in metrics:
            if name.split('/')[-1] == suffix:
                return name
    return next(iter(metrics))


def coco_subset(ann_file: str, num_images: int, out_dir: str) -> str:
    """A COCO file of the first ``num_images`` images of ``ann_file`` and their annotations.

    ``CocoMetric`` scores every image of its ``ann_file``, so a subset must
    have a file of its own (images without predictions would count as
    misses); the dataset reads the same file, so both see the same images.
    """
    with open(ann_file) as f:
        coco = json.load(f)
    images = coco['images'][:num_images]
    ids = {image['id'] for image in images}
    subset = dict(coco, images=images,
                  annotations=[a for a in coco['annotations'] if a['image_id'] in ids])
    os.makedirs(out_dir, exist_ok=True)
    # Absolute: a dataset joins a relative ann_file to its data_root.
    path = osp.join(osp.abspath(out_dir), f'{osp.splitext(osp.basename(ann_file))[0]}_first{num_images}.json')
    with open(path, 'w') as f:
        json.dump(subset, f)
    return path


def subset_val_config(cfg: Any, num_samples: int, out_dir: str) -> tuple[dict, Any]:
    """``(val_dataloader, val_evaluator)`` configs restricted to the first ``num_samples``.

    A ``CocoMetric`` with an ``ann_file`` gets a subset file shared with the
    dataset (:func:`coco_subset`); any other evaluator gets the dataset's
    ``indices``.
    """
    if not cfg.get('val_dataloader') or not cfg.get('val_evaluator'):
        raise ConfigError('--metric: the config has no val_dataloader / val_evaluator to '
                          'evaluate with')
    loader = copy.deepcopy(cfg.val_dataloader)
    evaluator = copy.deepcopy(cfg.val_evaluator)
    metrics = evaluator if isinstance(evaluator, list) else [evaluator]
    coco = [m for m in metrics if str(m.get('type', '')).endswith('CocoMetric')
            and m.get('ann_file')]
    if coco:
        subset = coco_subset(coco[0]['ann_file'], num_samples, out_dir)
        for metric in coco:
            metric['ann_file'] = subset
        loader.dataset['ann_file'] = subset
        loader.dataset.pop('indices', None)
    else:
        loader.dataset['indices'] = num_samples
    loader['num_workers'] = 0
    loader['persistent_workers'] = False
    return loader, evaluator


class SubsetMetric:
    """The config's validation metric on its first ``num_samples`` validation images.

    Called as ``metric(model) -> float``: runs ``model.val_step`` (under
    ``no_grad``) on every kept batch and returns the evaluator's entry
    :attr:`key`. The batches are loaded once, at construction.

    Args:
        cfg: An MMEngine config with ``val_dataloader`` and ``val_evaluator``.
        num_samples: Images of the validation set evaluated (the first ones).
        out_dir: Where a COCO subset file is written when one is needed.
        key: The metric reported; ``None``: :func:`pick_metric_key`'s choice,
            made at the first call.
    """

    def __init__(self, cfg: Any, num_samples: int, out_dir: str, key: str | None = None):
        from mmengine.evaluator import Evaluator
        from mmengine.registry import DefaultScope
        from mmengine.runner import Runner

        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f'--metric-samples {num_samples!r} must be a positive int')
        loader_cfg, evaluator_cfg = subset_val_config(cfg, num_samples, out_dir)
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            loader = Runner.build_dataloader(loader_cfg)
            self.evaluator = Evaluator(evaluator_cfg)
            self.evaluator.dataset_meta = loader.dataset.metainfo
            self.batches = list(loader)
        self.size = len(loader.dataset)
        self.key = key

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Every metric of the evaluator for ``model`` on the subset."""
        with torch.no_grad():
            for batch in self.batches:
                self.evaluator.process(data_samples=model.val_step(batch), data_batch=batch)
        # pycocotools prints its whole summary table at every call: once per point
        # of a landscape would bury the tool's own output.
        with contextlib.redirect_stdout(io.StringIO()):
            return self.evaluator.evaluate(self.size)

    def __call__(self, model: nn.Module) -> float:
        """The metric :attr:`key` of ``model`` on the subset."""
        metrics = self.evaluate(model)
        self.key = pick_metric_key(metrics, self.key)
        return float(metrics[self.key])
