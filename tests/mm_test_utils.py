"""Real configs in tests: parsed once, shrunk so the stock Runner trains them on a CPU."""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmengine.config import Config

from stock_models import disable_pretrained

SIZE_KEYS = {'Resize': 'scale', 'RandomResize': 'scale', 'RandomCrop': 'crop_size',
             'Mosaic': 'img_scale', 'MixUp': 'img_scale'}


@lru_cache(maxsize=None)
def _parsed_config(path: str) -> Config:
    return Config.fromfile(path)


def load_config(path: Path | str) -> Config:
    """``Config.fromfile(path)``, parsed once per session: each call gets its own copy."""
    return copy.deepcopy(_parsed_config(str(path)))


def _walk(obj: Any):
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value)


def dataset_types(cfg) -> set[str]:
    """``type`` of every dataset in the config's train dataloader."""
    return {d['type'] for d in _walk(cfg.train_dataloader.dataset)
            if isinstance(d.get('type'), str) and d['type'].endswith('Dataset')
            and d['type'] not in ('RepeatDataset', 'ConcatDataset')}


def shrink_for_test(cfg, work_dir: str, data_root: str, size: tuple[int, int],
                    max_iters: int = 2) -> None:
    """Point ``cfg`` at a tiny dataset and a 2-iteration schedule (in place).

    Everything else -- model, pipelines' transforms, optimizer, hooks -- stays
    the config's own; only image sizes shrink so a CPU can run it.
    """
    disable_pretrained(cfg.model)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=0)
    for loader_key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(loader_key)
        if not loader:
            continue
        loader.batch_size = 2 if loader_key == 'train_dataloader' else 1
        loader.num_workers = 0
        loader.persistent_workers = False
        for node in _walk(loader.dataset):
            if 'data_root' in node:
                node['data_root'] = data_root
            if node.get('type') == 'RepeatDataset':
                node['times'] = 1
            if 'filter_cfg' in node:
                node['filter_cfg'] = dict(filter_empty_gt=False)
            key = SIZE_KEYS.get(node.get('type'))
            if key:
                node[key] = (size[1], size[0]) if key in ('scale', 'img_scale') else size
            if node.get('type') == 'Pad' and 'size' in node:
                node['size'] = (size[1], size[0])  # (W, H)
            if node.get('type') == 'RandomAffine' and 'border' in node:
                node['border'] = (-size[1] // 2, -size[0] // 2)  # Mosaic's 2x canvas -> size
    for node in _walk(cfg.model):
        if node.get('type', '').endswith('DataPreprocessor') and 'size' in node:
            node['size'] = size
        if node.get('type') == 'BatchSyncRandomResize':
            node['random_size_range'] = (min(size), max(size))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=10_000)
    cfg.val_cfg = None
    cfg.val_dataloader = None
    cfg.val_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=max_iters,
                                        by_epoch=False)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.log_processor = dict(by_epoch=False)
    if 'visualization' in cfg.default_hooks:
        cfg.default_hooks.visualization.draw = False
