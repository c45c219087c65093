"""Tiny datasets in the real on-disk formats (COCO json, VOC xml, Cityscapes folders).

Each image holds a few filled rectangles / ellipses whose colour encodes the
class, so a model could in principle learn them; the tests only need the
formats to be exactly what the stock mmdet / mmseg datasets read.
"""
from __future__ import annotations

import json
import os
import os.path as osp

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(220, 20, 60), (30, 144, 255), (50, 205, 50), (255, 215, 0), (148, 0, 211)]


def _draw(rng: np.random.Generator, size: int, num_classes: int, max_objects: int = 3):
    img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
    label = Image.new('L', (size, size), 0)
    draw, draw_label = ImageDraw.Draw(img), ImageDraw.Draw(label)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, num_classes))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = (x0, y0, x0 + w, y0 + h)
        draw.rectangle(box, fill=COLOURS[cls % len(COLOURS)])
        draw_label.rectangle(box, fill=cls + 1)
        objects.append((cls, box))
    return img, label, objects


def make_coco(root: str, num_images: int = 4, size: int = 64, num_classes: int = 3,
              split: str = 'train', seed: int = 0,
              class_names: tuple[str, ...] | None = None) -> str:
    """Write ``root/{split}/*.png`` and ``root/annotations/instances_{split}.json``.

    ``class_names`` (default ``class0``, ``class1``, ...) name the categories;
    use names of the config's classes so the dataset keeps the boxes.
    """
    class_names = class_names or tuple(f'class{c}' for c in range(num_classes))
    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, split), exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, _, objects = _draw(rng, size, num_classes)
        name = f'{i:05d}.png'
        img.save(osp.join(root, split, name))
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
        for cls, (x0, y0, x1, y1) in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                                    category_id=cls + 1, bbox=[x0, y0, x1 - x0, y1 - y0],
                                    area=float((x1 - x0) * (y1 - y0)), iscrowd=0))
    categories = [dict(id=c + 1, name=name) for c, name in enumerate(class_names)]
    ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
    with open(ann_file, 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return ann_file


VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')


def make_voc(root: str, years=('2007', '2012'), num_images: int = 3, size: int = 96,
             seed: int = 0) -> None:
    """Write a VOCdevkit tree (JPEGImages, Annotations, ImageSets/Main/{trainval,test})."""
    rng = np.random.default_rng(seed)
    for year in years:
        base = osp.join(root, f'VOC{year}')
        for sub in ('JPEGImages', 'Annotations', 'ImageSets/Main'):
            os.makedirs(osp.join(base, sub), exist_ok=True)
        ids = []
        for i in range(num_images):
            img, _, objects = _draw(rng, size, 5)
            img_id = f'{year}_{i:06d}'
            ids.append(img_id)
            img.save(osp.join(base, 'JPEGImages', img_id + '.jpg'))
            objs = ''.join(
                f'<object><name>{VOC_CLASSES[cls]}</name><difficult>0</difficult>'
                f'<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>'
                f'<ymax>{y1}</ymax></bndbox></object>' for cls, (x0, y0, x1, y1) in objects)
            with open(osp.join(base, 'Annotations', img_id + '.xml'), 'w') as f:
                f.write(f'<annotation><filename>{img_id}.jpg</filename><size><width>{size}'
                        f'</width><height>{size}</height><depth>3</depth></size>{objs}'
                        '</annotation>')
        for split in ('trainval', 'test', 'train', 'val'):
            with open(osp.join(base, 'ImageSets/Main', f'{split}.txt'), 'w') as f:
                f.write('\n'.join(ids) + '\n')


def make_cityscapes(root: str, num_images: int = 2, size=(64, 128), seed: int = 0) -> None:
    """Write ``leftImg8bit/{train,val}/city/*`` and ``gtFine/.../*_labelTrainIds.png``."""
    rng = np.random.default_rng(seed)
    for split in ('train', 'val'):
        for i in range(num_images):
            img, label, _ = _draw(rng, max(size), 5)
            img = img.crop((0, 0, size[1], size[0]))
            label = np.array(label.crop((0, 0, size[1], size[0])))
            label = np.where(label > 0, label + 10, rng.integers(0, 3, label.shape))
            stem = f'city_{i:06d}_000019'
            for sub, suffix, image in (
                    ('leftImg8bit', '_leftImg8bit.png', img),
                    ('gtFine', '_gtFine_labelTrainIds.png',
                     Image.fromarray(label.astype(np.uint8)))):
                folder = osp.join(root, sub, split, 'city')
                os.makedirs(folder, exist_ok=True)
                image.save(osp.join(folder, stem + suffix))
