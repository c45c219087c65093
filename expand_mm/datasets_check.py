"""Fail early, and helpfully, when a config's dataset is not on disk."""
from __future__ import annotations

import os.path as osp
from typing import Any, Iterator

HOW_TO_GET = {
    'VOCdevkit': ('Pascal VOC 2007+2012: download VOCtrainval_06-Nov-2007.tar, '
                  'VOCtest_06-Nov-2007.tar and VOCtrainval_11-May-2012.tar from the '
                  'PASCAL VOC site and extract them so that data/VOCdevkit/VOC2007 and '
                  'data/VOCdevkit/VOC2012 exist (see mmdet docs: dataset_prepare.md)'),
    'coco': ('COCO 2017: download train2017, val2017 and annotations_trainval2017 from '
             'cocodataset.org and extract them to data/coco/{train2017,val2017,annotations}'),
    'cityscapes': ('Cityscapes: download leftImg8bit_trainvaltest.zip and '
                   'gtFine_trainvaltest.zip from cityscapes-dataset.com, extract them to '
                   'data/cityscapes and run mmseg\'s tools/dataset_converters/cityscapes.py '
                   'data/cityscapes to create the *_labelTrainIds.png maps'),
}
#: The 64x64 digits sets of configs/digits, distill, aux and planting (the demo's).
DIGITS64_OPTIONS = '--img-size 64 --min-scale 16 --max-scale 32 --max-digits 4'


def _digits_hint(data_root: str) -> str | None:
    """The command that writes the digits set under ``data_root``, or None if it is not one."""
    root = data_root.rstrip('/')
    if osp.basename(root) not in ('digits_det', 'digits_seg'):
        return None
    out = osp.dirname(root) or '.'
    options = f' {DIGITS64_OPTIONS}' if 'digits64' in out else ''
    return ('the digits set is drawn from scikit-learn\'s bundled digits: run `python '
            f'tools/make_digits_data.py --out {out}{options}`'
            + (' (tools/demo.py also writes it when missing)' if options else ''))


def _datasets(cfg: Any) -> Iterator[dict]:
    """Every dataset dict nested in ``cfg`` (through wrappers such as ConcatDataset)."""
    if isinstance(cfg, dict):
        if 'data_root' in cfg or 'ann_file' in cfg:
            yield cfg
        for value in cfg.values():
            yield from _datasets(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            yield from _datasets(value)


def _required_paths(dataset: dict) -> list[str]:
    root = dataset.get('data_root') or ''
    paths = [root] if root else []
    ann = dataset.get('ann_file')
    if isinstance(ann, str) and ann:
        paths.append(osp.join(root, ann))
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, dict):
        paths += [osp.join(root, p) for p in prefix.values() if isinstance(p, str) and p]
    return paths


def check_datasets(cfg: Any, loaders: tuple[str, ...] = ('train_dataloader', 'val_dataloader',
                                                          'test_dataloader')) -> None:
    """Raise ``FileNotFoundError`` naming the missing path and how to get the data.

    Args:
        cfg: An MMEngine config.
        loaders: The dataloader keys whose datasets must exist.
    """
    for key in loaders:
        loader = cfg.get(key) if hasattr(cfg, 'get') else None
        if not loader:
            continue
        for dataset in _datasets(loader.get('dataset', {})):
            for path in _required_paths(dataset):
                if osp.exists(path):
                    continue
                data_root = str(dataset.get('data_root', ''))
                hint = _digits_hint(data_root) or next(
                    (how for name, how in HOW_TO_GET.items() if name in data_root),
                    'put the dataset where the config expects it, or override '
                    f'{key}.dataset.data_root with --cfg-options')
                where = '' if osp.isabs(path) else f', i.e. {osp.abspath(path)!r} from here'
                raise FileNotFoundError(
                    f'{key}: dataset path {path!r} does not exist{where} (data_root='
                    f'{dataset.get("data_root")!r}). How to get it: {hint}.')
