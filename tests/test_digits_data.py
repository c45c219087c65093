"""Tests of the digits data generator (projects/digits/digits_data) and its dataset configs."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.digits import digits_data as mdd

ROOT = Path(__file__).resolve().parents[1]
DET_CONFIG = ROOT / 'projects/digits/configs/_base_/datasets/digits_det.py'
SEG_CONFIG = ROOT / 'projects/digits/configs/_base_/datasets/digits_seg.py'

SMALL = mdd.GenSettings(num_train=20, num_val=10, img_size=128, seed=3)
SPLITS = {'train': SMALL.num_train, 'val': SMALL.num_val}


@pytest.fixture(scope='module')
def out(tmp_path_factory) -> Path:
    """Both tiny datasets, generated once for the module."""
    path = tmp_path_factory.mktemp('digits')
    mdd.generate(path, 'both', SMALL, workers=1)
    return path


@pytest.fixture(scope='module')
def sources():
    images, labels = mdd.load_source_digits()
    train, val = mdd.split_sources(labels, SMALL.seed)
    return images, labels, dict(train=train, val=val)


def _coco(out: Path, split: str) -> dict:
    path = out / 'digits_det/annotations' / f'instances_{split}.json'
    return json.loads(path.read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file()}


def _rerender(task: str, split: str, index: int, sources):
    images, labels, pools = sources
    return mdd.render_canvas(mdd.canvas_rng(SMALL.seed, task, split, index),
                             SMALL, images, labels, pools[split])


# ----------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------
def test_layout(out):
    det, seg = out / 'digits_det', out / 'digits_seg'
    for split, n in SPLITS.items():
        assert len(list((det / split).glob('*.png'))) == n
        imgs = sorted(p.name for p in (seg / 'img_dir' / split).glob('*.png'))
        anns = sorted(p.name for p in (seg / 'ann_dir' / split).glob('*.png'))
        assert len(imgs) == n and imgs == anns
        assert (det / 'annotations' / f'instances_{split}.json').is_file()
    for task in ('det', 'seg'):
        meta = json.loads((out / f'digits_{task}/meta.json').read_text())
        assert meta['settings'] == mdd.settings_meta(task, SMALL)


def test_deterministic_and_independent_of_workers(out, tmp_path):
    mdd.generate(tmp_path, 'both', SMALL, workers=2)
    for task in ('det', 'seg'):
        first = _files(out / f'digits_{task}')
        second = _files(tmp_path / f'digits_{task}')
        assert first.keys() == second.keys()
        assert all(first[k] == second[k] for k in first)


def test_single_task_matches_both(out, tmp_path):
    mdd.generate(tmp_path, 'seg', SMALL, workers=1)
    assert not (tmp_path / 'digits_det').exists()
    assert _files(tmp_path / 'digits_seg') == _files(out / 'digits_seg')


def test_skip_force_and_settings_change(tmp_path):
    tiny = mdd.GenSettings(num_train=3, num_val=2, img_size=64, min_scale=12,
                           max_scale=32, seed=1)
    first = mdd.generate(tmp_path, 'det', tiny, workers=1)
    assert not first['det']['skipped']
    img = tmp_path / 'digits_det/train/000000.png'
    stamp = img.stat().st_mtime_ns
    again = mdd.generate(tmp_path, 'det', tiny, workers=1)
    assert again['det']['skipped']
    assert again['det']['summary'] == first['det']['summary']
    assert img.stat().st_mtime_ns == stamp
    assert not mdd.generate(tmp_path, 'det', tiny, force=True,
                            workers=1)['det']['skipped']
    fewer = mdd.GenSettings(**{**vars(tiny), 'num_train': 2})
    result = mdd.generate(tmp_path, 'det', fewer, workers=1)
    assert not result['det']['skipped']
    # Stale files of the bigger run must not linger.
    assert len(list((tmp_path / 'digits_det/train').glob('*.png'))) == 2
    (tmp_path / 'digits_det/val/000001.png').unlink()
    assert not mdd.is_up_to_date(tmp_path, 'det', fewer)


def test_invalid_settings():
    with pytest.raises(ValueError):
        mdd.GenSettings(img_size=64, max_scale=60).validate()
    with pytest.raises(ValueError):
        mdd.GenSettings(min_digits=3, max_digits=2).validate()


def test_source_split_disjoint(out, sources):
    _, labels, pools = sources
    assert not np.intersect1d(pools['train'], pools['val']).size
    assert len(pools['train']) + len(pools['val']) == len(labels) == 1797
    for pool in pools.values():
        assert set(labels[pool]) == set(range(10))
    det_used = {s: {a['source_index'] for a in _coco(out, s)['annotations']}
                for s in SPLITS}
    seg_used = {}
    for s in SPLITS:
        data = json.loads((out / f'digits_seg/sources_{s}.json').read_text())
        seg_used[s] = {src for pairs in data.values() for _, src in pairs}
    for used in (det_used, seg_used):
        assert not used['train'] & used['val']
        for s in SPLITS:
            assert used[s] <= set(pools[s].tolist())


def test_coco_annotations(out):
    for split, n in SPLITS.items():
        coco = _coco(out, split)
        assert [c['name'] for c in coco['categories']] == list(mdd.CLASSES)
        assert [c['id'] for c in coco['categories']] == list(range(1, 11))
        assert len(coco['images']) == n
        image_ids = {im['id'] for im in coco['images']}
        assert len(image_ids) == n and 0 not in image_ids
        ann_ids = [a['id'] for a in coco['annotations']]
        assert len(set(ann_ids)) == len(ann_ids) and 0 not in ann_ids
        per_image = {}
        for a in coco['annotations']:
            x, y, w, h = a['bbox']
            assert all(isinstance(v, int) for v in a['bbox'])
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1
            assert x + w <= SMALL.img_size and y + h <= SMALL.img_size
            assert 1 <= a['category_id'] <= 10
            assert a['area'] == w * h and a['iscrowd'] == 0
            assert a['image_id'] in image_ids
            per_image[a['image_id']] = per_image.get(a['image_id'], 0) + 1
        assert set(per_image) == image_ids
        assert all(1 <= c <= SMALL.max_digits for c in per_image.values())


def test_boxes_tight_around_visible_strokes(out, sources):
    """Saved boxes and images are exactly what the renderer drew."""
    for split in SPLITS:
        coco = _coco(out, split)
        for im in coco['images']:
            index = int(Path(im['file_name']).stem)
            canvas = _rerender('det', split, index, sources)
            saved = np.asarray(Image.open(out / 'digits_det' / split /
                                          im['file_name']))
            np.testing.assert_array_equal(saved, canvas.image)
            anns = [a for a in coco['annotations']
                    if a['image_id'] == im['id']]
            assert len(anns) == len(canvas.instances)
            for a, inst in zip(anns, canvas.instances):
                assert inst.visible.any()
                assert not (inst.visible & ~inst.stroke).any()
                assert inst.visible_fraction >= mdd.MIN_VISIBLE
                x, y, w, h = a['bbox']
                box = np.zeros_like(inst.visible)
                box[y:y + h, x:x + w] = True
                assert not (inst.visible & ~box).any()
                # Tight: every edge row/column of the box holds a stroke pixel.
                assert inst.visible[y, x:x + w].any()
                assert inst.visible[y + h - 1, x:x + w].any()
                assert inst.visible[y:y + h, x].any()
                assert inst.visible[y:y + h, x + w - 1].any()
                assert a['category_id'] == inst.label + 1
                assert a['source_index'] == inst.source_index


def test_strokes_contrast_with_background(sources):
    """Each digit stands out from the pixels around it and from the digits
    it crosses."""
    from scipy.ndimage import binary_dilation

    luma = np.array([0.299, 0.587, 0.114])
    for index in range(SPLITS['train']):
        canvas = _rerender('det', 'train', index, sources)
        lum = canvas.image.astype(np.float64) @ luma
        every_stroke = np.any([i.stroke for i in canvas.instances], axis=0)
        # Skip the blended edge band, which is neither ink nor background.
        near = binary_dilation(every_stroke, iterations=2)
        for inst in canvas.instances:
            if inst.visible_fraction < 1:
                continue
            ring = binary_dilation(inst.stroke, iterations=6) & ~near
            contrast = abs(np.median(lum[inst.stroke]) - np.median(lum[ring]))
            assert contrast > 0.2 * 255, (index, inst.label, contrast)
        # Where a digit crosses an earlier one, the two strokes differ too.
        for k, below in enumerate(canvas.instances):
            for above in canvas.instances[k + 1:]:
                overlap = below.stroke & above.stroke
                if overlap.sum() < 20:
                    continue
                contrast = abs(np.median(lum[overlap]) -
                               np.median(lum[below.visible]))
                assert contrast > 0.2 * 255, (index, k, contrast)


def test_seg_label_maps(out, sources):
    allowed = set(range(11)) | {mdd.IGNORE_INDEX}
    for split in SPLITS:
        listing = json.loads(
            (out / f'digits_seg/sources_{split}.json').read_text())
        for stem, pairs in listing.items():
            label = Image.open(out / 'digits_seg/ann_dir' / split /
                               f'{stem}.png')
            image = Image.open(out / 'digits_seg/img_dir' / split /
                               f'{stem}.png')
            assert label.mode == 'L' and image.mode == 'RGB'
            assert label.size == image.size == (SMALL.img_size, ) * 2
            values = set(np.unique(np.asarray(label)).tolist())
            assert values <= allowed
            assert 0 in values and mdd.IGNORE_INDEX in values
            drawn = {digit + 1 for digit, _ in pairs}
            assert values - {0, mdd.IGNORE_INDEX} <= drawn
        # The label of every digit pixel lies inside a box of that digit.
        canvas = _rerender('seg', split, 0, sources)
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / 'digits_seg/ann_dir' / split /
                                  '000000.png')), canvas.label_map)
        for cls in range(10):
            inside = np.zeros(canvas.label_map.shape, bool)
            for inst in canvas.instances:
                if inst.label == cls:
                    inside |= inst.stroke
            pixels = canvas.label_map == cls + 1
            assert not (pixels & ~inside).any()


def test_render_digit_smooth_and_cropped():
    images, _ = mdd.load_source_digits()
    v = mdd.render_digit(images[0], 40, 10.0)
    assert 30 <= max(v.shape) <= 60
    assert v.min() >= 0 and v.max() <= 1
    ink = v > mdd.STROKE_THRESHOLD - mdd.EDGE_BAND
    assert ink[0].any() and ink[-1].any()
    assert ink[:, 0].any() and ink[:, -1].any()
    # Bicubic upscaling gives many grey levels, not 17 blocky ones.
    assert len(np.unique(np.round(v, 3))) > 100


def test_cli(tmp_path, capsys):
    args = ['--out', str(tmp_path), '--task', 'both', '--num-train', '4',
            '--num-val', '2', '--img-size', '96', '--max-scale', '40',
            '--workers', '1', '--preview', str(tmp_path / 'preview.png')]
    assert mdd.main(args) == 0
    text = capsys.readouterr().out
    assert '[det] generated' in text and '[seg] generated' in text
    assert 'per class' in text
    preview = Image.open(tmp_path / 'preview.png')
    assert preview.mode == 'RGB' and preview.size[0] > 4 * 96
    assert mdd.main(args) == 0
    assert 'up to date, skipped' in capsys.readouterr().out
    assert mdd.main(['--out', str(tmp_path), '--img-size', '32']) == 2


@pytest.mark.slow
@pytest.mark.parametrize('tool', ['projects/digits/tools/make_digits_data.py',
                                  'tools/make_digits_data.py'])
def test_tool_finds_its_package_and_the_old_path_forwards_to_it(tool, tmp_path):
    """Run from another directory without PYTHONPATH: the tool puts the repository root on
    sys.path itself; the old path says where the tool moved (one stderr line) and runs it."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(
        [sys.executable, str(ROOT / tool), '--out', str(tmp_path), '--task', 'det',
         '--num-train', '2', '--num-val', '1', '--img-size', '64', '--max-scale', '32',
         '--workers', '1'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '[det] generated' in proc.stdout
    assert len(list((tmp_path / 'digits_det/train').glob('*.png'))) == 2
    moved = 'tools/make_digits_data.py is deprecated: run projects/digits/tools/make_digits_data.py'
    assert (moved in proc.stderr) == tool.startswith('tools/')


@pytest.mark.parametrize('settings', [mdd.DIGITS64, mdd.GenSettings(),
                                      mdd.GenSettings(num_train=24, num_val=8, min_digits=2,
                                                      seed=5)])
def test_data_command_writes_the_settings_it_was_made_from(settings):
    command = mdd.data_command('data/some dir', settings).split(' ', 2)
    assert command[:2] == ['python', mdd.TOOL]
    args = mdd.parse_args(shlex.split(command[2]))
    assert args.out == 'data/some dir'
    assert mdd.GenSettings(**{k: getattr(args, k) for k in asdict(settings)}) == settings


def test_a_missing_digits_set_is_named_with_the_command_that_writes_it(tmp_path):
    """The dataset base configs import projects.digits.data_hint (custom_imports), which
    registers the digits hint with expand_mm's missing-data check."""
    from mmengine import Config

    from expand_mm.datasets_check import DatasetNotFoundError, check_datasets
    from expand_mm.errors import ExpandMMError
    cfg = Config.fromfile(str(SEG_CONFIG))
    cfg.train_dataloader.dataset.data_root = f'{tmp_path}/digits_seg/'
    command = mdd.data_command(str(tmp_path), mdd.GenSettings())
    with pytest.raises(DatasetNotFoundError, match=re.escape(f'run `{command}`')) as err:
        check_datasets(cfg, ('train_dataloader',))
    assert isinstance(err.value, ExpandMMError) and isinstance(err.value, FileNotFoundError)
    cfg.train_dataloader.dataset.data_root = f'{tmp_path}/VOCdevkit/'
    with pytest.raises(DatasetNotFoundError, match='Pascal VOC 2007'):
        check_datasets(cfg, ('train_dataloader',))


# ----------------------------------------------------------------------------
# The real mmdet / mmseg datasets built from the configs
# ----------------------------------------------------------------------------
def _build_dataset(registry, scope: str, cfg):
    from mmengine.registry import DefaultScope

    # The pipeline transforms are looked up in the default scope's registry.
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg)


def _dataset_cfg(config_path: Path, loader: str, data_root: Path):
    from mmengine import Config

    cfg = Config.fromfile(str(config_path))
    ds_cfg = copy.deepcopy(cfg[loader]['dataset'])
    ds_cfg['data_root'] = str(data_root) + '/'
    return cfg, ds_cfg


def test_mmdet_coco_dataset_loads(out):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg, _ = _dataset_cfg(DET_CONFIG, 'train_dataloader', out)
    assert not any(t['type'] == 'RandomFlip' for t in cfg.train_pipeline)
    for loader, split in (('train_dataloader', 'train'),
                          ('val_dataloader', 'val')):
        _, ds_cfg = _dataset_cfg(DET_CONFIG, loader, out / 'digits_det')
        dataset = _build_dataset(DATASETS, 'mmdet', ds_cfg)
        assert type(dataset).__name__ == 'CocoDataset'
        assert len(dataset) == SPLITS[split]
        assert dataset.metainfo['classes'] == mdd.CLASSES
        assert dataset.cat2label == {i + 1: i for i in range(10)}
        coco = _coco(out, split)
        sample = dataset[0]
        assert set(sample) == {'inputs', 'data_samples'}
        assert tuple(sample['inputs'].shape) == (3, 128, 128)
        data_sample = sample['data_samples']
        img_id = data_sample.img_id
        anns = [a for a in coco['annotations'] if a['image_id'] == img_id]
        boxes = data_sample.gt_instances.bboxes
        boxes = getattr(boxes, 'tensor', boxes).numpy()
        want = np.array([[x, y, x + w, y + h]
                         for x, y, w, h in (a['bbox'] for a in anns)])
        np.testing.assert_allclose(boxes, want)
        np.testing.assert_array_equal(
            data_sample.gt_instances.labels.numpy(),
            [a['category_id'] - 1 for a in anns])
        assert data_sample.ori_shape == (128, 128)


def test_mmdet_coco_metric_perfect_on_ground_truth(out):
    """Feeding the val boxes back as predictions scores mAP 1.0, which holds
    only if ids, categories and labels line up end to end."""
    import torch
    from mmdet.evaluation import CocoMetric

    coco = _coco(out, 'val')
    metric = CocoMetric(
        ann_file=str(out / 'digits_det/annotations/instances_val.json'),
        metric='bbox')
    metric.dataset_meta = dict(classes=mdd.CLASSES)
    for im in coco['images']:
        anns = [a for a in coco['annotations'] if a['image_id'] == im['id']]
        bboxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                               (a['bbox'] for a in anns)], dtype=torch.float32)
        metric.process({}, [dict(
            img_id=im['id'], ori_shape=(im['height'], im['width']),
            pred_instances=dict(
                bboxes=bboxes, scores=torch.ones(len(anns)),
                labels=torch.tensor([a['category_id'] - 1 for a in anns])))])
    results = metric.evaluate(len(coco['images']))
    assert results['coco/bbox_mAP'] == pytest.approx(1.0)


def test_mmseg_dataset_loads(out):
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg, _ = _dataset_cfg(SEG_CONFIG, 'train_dataloader', out)
    assert cfg.crop_size == (128, 128)
    assert not any('Flip' in t['type'] for t in cfg.train_pipeline)
    assert cfg.val_evaluator['type'] == 'IoUMetric'
    allowed = set(range(11)) | {255}
    for loader, split in (('train_dataloader', 'train'),
                          ('val_dataloader', 'val')):
        _, ds_cfg = _dataset_cfg(SEG_CONFIG, loader, out / 'digits_seg')
        dataset = _build_dataset(DATASETS, 'mmseg', ds_cfg)
        assert type(dataset).__name__ == 'BaseSegDataset'
        assert len(dataset) == SPLITS[split]
        assert dataset.metainfo['classes'] == mdd.SEG_CLASSES
        assert len(dataset.metainfo['palette']) == 11
        info = dataset.get_data_info(0)
        assert Path(info['img_path']).stem == Path(info['seg_map_path']).stem
        assert info['reduce_zero_label'] is False
        sample = dataset[0]
        assert set(sample) == {'inputs', 'data_samples'}
        inputs = sample['inputs']
        gt = sample['data_samples'].gt_sem_seg.data
        assert inputs.shape[0] == 3 and gt.shape[0] == 1
        assert tuple(inputs.shape[1:]) == tuple(gt.shape[1:])
        assert set(gt.unique().tolist()) <= allowed
        if split == 'val':
            assert tuple(inputs.shape[1:]) == (128, 128)
            label = np.asarray(Image.open(info['seg_map_path']))
            np.testing.assert_array_equal(gt[0].numpy(), label)
        else:
            assert max(inputs.shape[1:]) <= 128

