"""Build small detection and segmentation datasets from scikit-learn's digits.

The 1,797 real 8x8 handwritten digits bundled with scikit-learn
(``sklearn.datasets.load_digits``) are upscaled, rotated and composited onto
varied synthetic backgrounds. Nothing is downloaded.

Outputs (under ``--out``, default ``data``)::

    digits_det/{train,val}/000000.png ...
    digits_det/annotations/instances_{train,val}.json   # COCO, bbox only
    digits_det/meta.json
    digits_seg/img_dir/{train,val}/000000.png ...
    digits_seg/ann_dir/{train,val}/000000.png ...       # uint8 label maps
    digits_seg/sources_{train,val}.json                 # source digit ids
    digits_seg/meta.json

Definitions shared by both tasks:

* A digit's *intensity* ``v`` is its 8x8 image (scaled to [0, 1]) resampled
  bicubically to the drawn size and rotation.
* *Stroke* pixels are ``v >= STROKE_THRESHOLD``. Ink is alpha-blended with
  ``alpha = clip((v - t_lo) / (t_hi - t_lo), 0, 1)`` where
  ``t_lo, t_hi = STROKE_THRESHOLD -/+ EDGE_BAND``, so a stroke pixel is one
  that is at least half ink.
* Digits are painted in order; a later digit's stroke pixels occlude earlier
  ones. Detection boxes are the tight boxes of each digit's *visible* stroke
  pixels (its stroke mask minus later digits' stroke masks). Placement is
  rejected if it would leave any digit with less than ``MIN_VISIBLE`` of its
  stroke pixels, or make boxes overlap too much, so every digit stays
  identifiable.
* Segmentation labels are painted in the same order: digit class + 1 where
  ``v >= t_hi`` (pure ink), ``IGNORE_INDEX`` (255) where ``t_lo < v < t_hi``
  (blended edge pixels), untouched elsewhere; 0 is background.

The train/val split is made over the *source* 8x8 images (stratified by
class), so no source image appears in both splits.

Usage::

    python tools/make_digits_data.py                    # both tasks, defaults
    python tools/make_digits_data.py --task det --num-train 200 --num-val 50
    python tools/make_digits_data.py --preview work_dirs/digits_preview.png

Generation is spread over ``--workers`` processes (default: available CPUs,
at most 8); every canvas has its own seeded random stream, so the files are
byte-identical whatever the worker count.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
SEG_CLASSES: tuple[str, ...] = ('background', ) + CLASSES
# COCO category ids start at 1 by convention; mmdet's CocoDataset maps them to
# labels through the category *names*, in the order the categories are listed.
CATEGORY_ID_OFFSET = 1
IGNORE_INDEX = 255

STROKE_THRESHOLD = 0.4
EDGE_BAND = 0.1
MIN_VISIBLE = 0.7
MAX_BOX_IOU = 0.45
# Intersection over the smaller box: stops a small digit sitting inside a large
# one, which IoU alone lets through.
MAX_BOX_CONTAINMENT = 0.65
MAX_ROTATION_DEG = 15.0
MAX_ASPECT_JITTER = 0.1
VAL_SOURCE_FRACTION = 0.2
# Luminance span of every background element; digits get at least
# MIN_CONTRAST against the local background, so distractor lines and blobs
# are always fainter than the digits.
BG_LUM_SPAN = 0.35
MIN_CONTRAST = 0.3
PLACEMENT_TRIES = 30
# Digits may cross only where a stroke colour exists that contrasts with at
# least this fraction of the crossed strokes' pixels.
MIN_CROSSING_SCORE = 0.9
MAX_NOISE_SIGMA = 0.04
# Bump when the rendering changes so cached datasets are regenerated.
GENERATOR_VERSION = 1

_LUMA = (0.299, 0.587, 0.114)
_TASK_IDS = {'det': 1, 'seg': 2}
_SPLIT_IDS = {'train': 1, 'val': 2}
_SPLIT_SEED_SALT = 7919

# Ten well-separated colours for the digit classes (also used by the configs).
PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212)
]


@dataclass(frozen=True)
class GenSettings:
    """Everything that determines the generated files.

    Attributes:
        num_train: Number of training canvases.
        num_val: Number of validation canvases.
        img_size: Side of the square RGB canvas in pixels.
        min_digits: Minimum digits attempted per canvas.
        max_digits: Maximum digits attempted per canvas.
        min_scale: Minimum side, in pixels, of an upscaled 8x8 digit.
        max_scale: Maximum side, in pixels, of an upscaled 8x8 digit.
        seed: Seed of the source split and of every canvas.
    """

    num_train: int = 2000
    num_val: int = 500
    img_size: int = 128
    min_digits: int = 1
    max_digits: int = 5
    min_scale: int = 16
    max_scale: int = 48
    seed: int = 0

    def validate(self) -> None:
        """Checks that the settings describe a feasible dataset.

        Raises:
            ValueError: If a value is out of range.
        """
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError('num_train and num_val must be >= 1')
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError('need 1 <= min_digits <= max_digits')
        if not 8 <= self.min_scale <= self.max_scale:
            raise ValueError('need 8 <= min_scale <= max_scale')
        # A digit rotated by 15 degrees spans up to ~1.22x its side.
        if self.max_scale * 1.3 > self.img_size:
            raise ValueError(
                f'max_scale={self.max_scale} too large for '
                f'img_size={self.img_size} (need max_scale*1.3 <= img_size)')
        if self.seed < 0:
            raise ValueError('seed must be >= 0')


@dataclass
class DigitInstance:
    """One digit drawn on a canvas.

    Attributes:
        label: Digit class 0-9.
        source_index: Index of the 8x8 source image in ``load_digits()``.
        stroke: Full stroke mask (``v >= STROKE_THRESHOLD``), canvas-sized.
        visible: Stroke mask minus the strokes of digits drawn later.
        bbox: Tight ``[x, y, w, h]`` box of ``visible`` (pixel-edge
            coordinates, so ``x + w`` is one past the last stroke column).
    """

    label: int
    source_index: int
    stroke: np.ndarray
    visible: np.ndarray
    bbox: list[int] = field(default_factory=list)

    @property
    def visible_fraction(self) -> float:
        """Fraction of this digit's stroke pixels left visible."""
        return float(self.visible.sum()) / max(1, int(self.stroke.sum()))


@dataclass
class Canvas:
    """A rendered sample.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        label_map: ``(H, W)`` uint8 segmentation labels (0 background,
            class + 1 on strokes, ``IGNORE_INDEX`` on blended edges).
        instances: Digits in painting order.
    """

    image: np.ndarray
    label_map: np.ndarray
    instances: list[DigitInstance]


# ----------------------------------------------------------------------------
# Sources and split
# ----------------------------------------------------------------------------
def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's bundled 8x8 digits.

    Returns:
        ``(images, labels)``: float32 ``(N, 8, 8)`` intensities in [0, 1] and
        int64 ``(N,)`` classes, with N = 1797.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


def split_sources(labels: np.ndarray, seed: int,
                  val_fraction: float = VAL_SOURCE_FRACTION
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Splits source digit images into disjoint train/val pools.

    The split is stratified by class so both pools cover all ten digits.

    Args:
        labels: ``(N,)`` class of each source image.
        seed: Seed of the split.
        val_fraction: Fraction of each class's images that go to val.

    Returns:
        ``(train_indices, val_indices)``, sorted int64 arrays.
    """
    rng = np.random.default_rng([seed, _SPLIT_SEED_SALT])
    train, val = [], []
    for cls in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, int(round(val_fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx = np.sort(np.concatenate(train))
    val_idx = np.sort(np.concatenate(val))
    assert not np.intersect1d(train_idx, val_idx).size, \
        'source split must be disjoint'
    return train_idx, val_idx


def canvas_rng(seed: int, task: str, split: str,
               index: int) -> np.random.Generator:
    """Returns the random generator of one canvas.

    Each canvas gets its own stream, so a canvas does not depend on how many
    others were drawn before it, nor on which tasks are generated.

    Args:
        seed: Global seed.
        task: ``'det'`` or ``'seg'``.
        split: ``'train'`` or ``'val'``.
        index: Canvas index within the split.

    Returns:
        A seeded ``numpy.random.Generator``.
    """
    return np.random.default_rng(
        [seed, _TASK_IDS[task], _SPLIT_IDS[split], index])


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------
def _luminance(rgb: np.ndarray) -> np.ndarray:
    # Explicit sum rather than a matmul: no BLAS threads in forked workers.
    return (rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] +
            rgb[..., 2] * _LUMA[2])


def colour_with_luminance(rng: np.random.Generator, lum: float,
                          saturation: float) -> np.ndarray:
    """Draws a random colour of (about) a given luminance.

    Adding a zero-luminance offset keeps the luminance exact until clipping;
    a few retries with the offset shrunk keep it close after clipping.

    Args:
        rng: Random generator.
        lum: Target Rec. 601 luminance in [0, 1].
        saturation: Scale of the chromatic offset, 0 gives grey.

    Returns:
        float32 RGB in [0, 1].
    """
    u = rng.random(3).astype(np.float32)
    offset = u - _luminance(u)
    for shrink in (1.0, 0.5, 0.25):
        colour = np.clip(lum + saturation * shrink * offset, 0.0, 1.0)
        if abs(float(_luminance(colour)) - lum) < 0.03:
            return colour.astype(np.float32)
    return np.full(3, lum, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    return c0 + (c1 - c0) * t[..., None]


def _overlay(img: np.ndarray, mask: Image.Image, colour: np.ndarray,
             opacity: float) -> None:
    # Blend only inside the mask's bounding box: overlays are small.
    box = mask.getbbox()
    if box is None:
        return
    x0, y0, x1, y1 = box
    a = np.asarray(mask.crop(box), np.float32)[..., None] * (opacity / 255)
    region = img[y0:y1, x0:x1]
    region += (colour - region) * a


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Renders a varied, textured background.

    A base (flat, linear or radial gradient, smooth colour noise, or waves
    and checkers) gets soft blobs and lines on top. All colours share one
    luminance band of width ``BG_LUM_SPAN``, so a digit colour with enough
    contrast always exists and the distractors stay fainter than the digits.
    Pixel noise is added by ``render_canvas`` once the digits are drawn.

    Args:
        rng: Random generator.
        size: Canvas side in pixels.

    Returns:
        float32 ``(size, size, 3)`` image in [0, 1].
    """
    lum_lo = rng.uniform(0.0, 1.0 - BG_LUM_SPAN - 0.03)

    def colour() -> np.ndarray:
        return colour_with_luminance(
            rng, rng.uniform(lum_lo, lum_lo + BG_LUM_SPAN),
            rng.uniform(0, 0.8))

    yy, xx = _unit_grid(size)
    kind = int(rng.integers(5))
    if kind == 0:
        img = np.empty((size, size, 3), np.float32)
        img[:] = colour()
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * xx + np.sin(theta) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = _lerp(colour(), colour(), t)
    elif kind == 2:
        cx, cy = rng.uniform(-0.2, 1.2, 2)
        radius = rng.uniform(0.4, 1.2)
        t = np.minimum(np.hypot(xx - cx, yy - cy) / radius, 1)
        img = _lerp(colour(), colour(), t)
    elif kind == 3:
        grid = int(rng.integers(3, 12))
        low = np.stack([colour() for _ in range(grid * grid)])
        low = low.reshape(grid, grid, 3)
        img = np.stack([
            np.asarray(
                Image.fromarray(np.ascontiguousarray(low[..., c])).resize(
                    (size, size), Image.Resampling.BICUBIC))
            for c in range(3)
        ], axis=-1)
    else:
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 10)
        phase = rng.uniform(0, 2 * np.pi)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
        if rng.random() < 0.5:
            # Crossed waves give a checker-like texture.
            w = np.cos(theta) * yy - np.sin(theta) * xx
            t = t * (0.5 + 0.5 * np.sin(2 * np.pi * freq * w))
        img = _lerp(colour(), colour(), t)
    img = np.ascontiguousarray(img, dtype=np.float32)

    for _ in range(int(rng.integers(0, 5))):
        mask = Image.new('L', (size, size), 0)
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        ImageDraw.Draw(mask).ellipse([x0, y0, x0 + w, y0 + h], fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0, 4)))
        _overlay(img, mask, colour(), rng.uniform(0.3, 1))
    for _ in range(int(rng.integers(0, 5))):
        mask = Image.new('L', (size, size), 0)
        pts = (rng.uniform(-0.1, 1.1, 4) * size).tolist()
        ImageDraw.Draw(mask).line(pts, fill=255, width=int(rng.integers(1, 4)))
        _overlay(img, mask, colour(), rng.uniform(0.4, 1))
    return np.clip(img, 0, 1, out=img)


def render_digit(source: np.ndarray, scale: float, angle_deg: float,
                 aspect: float = 1.0) -> np.ndarray:
    """Upscales and rotates one 8x8 digit in a single bicubic resampling.

    Args:
        source: ``(8, 8)`` intensities in [0, 1].
        scale: Side in pixels that the 8x8 grid is stretched to.
        angle_deg: Counter-clockwise rotation in degrees.
        aspect: Width / height stretch of the digit.

    Returns:
        float32 intensity patch in [0, 1], cropped to the pixels with any ink
        (``v > STROKE_THRESHOLD - EDGE_BAND``). Empty if no pixel has ink.
    """
    # Zero padding gives the bicubic kernel a clean background at the border.
    pad = 2
    src = np.pad(source.astype(np.float32), pad)
    n = src.shape[0]
    kx = scale / 8.0 * np.sqrt(aspect)
    ky = scale / 8.0 / np.sqrt(aspect)
    theta = np.deg2rad(angle_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    half = 0.5 * n * max(kx, ky) * (abs(cos) + abs(sin))
    out = int(np.ceil(2 * half)) + 2
    c_out, c_src = out / 2.0, n / 2.0
    # PIL wants the inverse map output -> source: rotate back, then unscale.
    a, b = cos / kx, -sin / kx
    d, e = sin / ky, cos / ky
    data = (a, b, c_src - a * c_out - b * c_out,
            d, e, c_src - d * c_out - e * c_out)
    patch = Image.fromarray(src).transform(
        (out, out), Image.Transform.AFFINE, data,
        resample=Image.Resampling.BICUBIC, fillcolor=0)
    v = np.clip(np.asarray(patch, dtype=np.float32), 0, 1)
    ink = v > STROKE_THRESHOLD - EDGE_BAND
    if not ink.any():
        return np.zeros((0, 0), np.float32)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return v[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def tight_bbox(mask: np.ndarray) -> list[int]:
    """Returns the tight ``[x, y, w, h]`` box of a boolean mask.

    Args:
        mask: 2-D boolean array with at least one True pixel.

    Returns:
        Box in pixel-edge coordinates: ``x + w`` is one past the last column.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]),
            int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _box_overlap(a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a, area_b = a[2] * a[3], b[2] * b[3]
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


_LUM_GRID = np.linspace(0.0, 1.0, 51, dtype=np.float32)


def _contrast_score(lum: np.ndarray) -> np.ndarray:
    # Per candidate luminance: fraction of pixels it contrasts with.
    if lum.size == 0:
        return np.ones_like(_LUM_GRID)
    return (np.abs(lum[None, :] - _LUM_GRID[:, None]) >= MIN_CONTRAST).mean(1)


def ink_luminance_options(bg_lum: np.ndarray,
                          ink_lum: np.ndarray) -> tuple[np.ndarray, float]:
    """Finds the stroke luminances that stand out from what lies beneath.

    A candidate luminance is scored by the fraction of the covered pixels
    that it differs from by at least ``MIN_CONTRAST``; scoring every pixel
    (not the mean) keeps one bright or dark spot from hiding the digit.
    Contrast with the background comes first (candidates within 5% of the
    best score); among those, the ones that best contrast with the earlier
    digits being crossed are kept, so overlapping digits do not merge.

    Args:
        bg_lum: Luminances of the background pixels under the new ink.
        ink_lum: Luminances of earlier digits' stroke pixels under the new
            ink (may be empty).

    Returns:
        ``(candidates, crossing_score)``: candidate luminances, and the
        fraction of ``ink_lum`` pixels they contrast with (1 if empty).
    """
    bg_score = _contrast_score(bg_lum)
    ok = bg_score >= bg_score.max() - 0.05
    ink_score = np.where(ok, _contrast_score(ink_lum), -1.0)
    best = float(ink_score.max())
    return _LUM_GRID[ink_score >= best - 0.05], best


def pick_ink_colour(rng: np.random.Generator, bg_lum: np.ndarray,
                    ink_lum: np.ndarray) -> np.ndarray:
    """Chooses a stroke colour that contrasts with what it is drawn over.

    Args:
        rng: Random generator.
        bg_lum: Luminances of the background pixels under the new ink.
        ink_lum: Luminances of earlier digits' stroke pixels under it.

    Returns:
        float32 RGB in [0, 1], drawn among ``ink_luminance_options``.
    """
    candidates, _ = ink_luminance_options(bg_lum, ink_lum)
    target = float(candidates[rng.integers(len(candidates))])
    target = float(np.clip(target + rng.uniform(-0.01, 0.01), 0.0, 1.0))
    return colour_with_luminance(rng, target, rng.uniform(0, 0.9))


def _lum_under(img: np.ndarray, label_map: np.ndarray, inked: np.ndarray,
               region: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    # Split the pixels the new ink covers into background and earlier
    # digits' strokes; blended edge pixels (255) belong to neither.
    lum = _luminance(img[region])
    lm = label_map[region]
    return (lum[inked & (lm == 0)],
            lum[inked & (lm != 0) & (lm != IGNORE_INDEX)])


def _placement_ok(instances: list[DigitInstance], stroke_patch: np.ndarray,
                  inked: np.ndarray, y0: int, x0: int, box: list[int],
                  img: np.ndarray, label_map: np.ndarray) -> bool:
    # Box tests first: they are cheap and reject most bad placements.
    for inst in instances:
        iou, contain = _box_overlap(box, inst.bbox)
        if iou > MAX_BOX_IOU or contain > MAX_BOX_CONTAINMENT:
            return False
    ph, pw = stroke_patch.shape
    region = (slice(y0, y0 + ph), slice(x0, x0 + pw))
    crossing = False
    for inst in instances:
        if _box_overlap(box, inst.bbox)[0] == 0.0:
            continue
        lost = np.count_nonzero(inst.visible[region] & stroke_patch)
        crossing |= lost > 0
        if np.count_nonzero(inst.visible) - lost < \
                MIN_VISIBLE * np.count_nonzero(inst.stroke):
            return False
    if crossing:
        # Overlap only where one colour can contrast with both the background
        # and the digits crossed; otherwise the strokes would merge.
        _, score = ink_luminance_options(
            *_lum_under(img, label_map, inked, region))
        if score < MIN_CROSSING_SCORE:
            return False
    return True


def render_canvas(rng: np.random.Generator, settings: GenSettings,
                  images: np.ndarray, labels: np.ndarray,
                  pool: np.ndarray) -> Canvas:
    """Renders one canvas with 1..max_digits digits from a source pool.

    Args:
        rng: Random generator of this canvas (see ``canvas_rng``).
        settings: Generation settings.
        images: ``(N, 8, 8)`` source intensities.
        labels: ``(N,)`` source classes.
        pool: Indices of the source images this split may use.

    Returns:
        The rendered canvas. The first digit is always placed; later ones
        are dropped when no placement within ``PLACEMENT_TRIES`` respects the
        occlusion caps, so a canvas can hold fewer than it attempted.
    """
    size = settings.img_size
    img = make_background(rng, size)
    label_map = np.zeros((size, size), np.uint8)
    instances: list[DigitInstance] = []
    t_lo, t_hi = STROKE_THRESHOLD - EDGE_BAND, STROKE_THRESHOLD + EDGE_BAND

    n_digits = int(rng.integers(settings.min_digits, settings.max_digits + 1))
    for _ in range(n_digits):
        src = int(pool[rng.integers(len(pool))])
        scale = rng.uniform(settings.min_scale, settings.max_scale)
        angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        aspect = 1.0 + rng.uniform(-MAX_ASPECT_JITTER, MAX_ASPECT_JITTER)
        v = render_digit(images[src], scale, angle, aspect)
        ph, pw = v.shape
        if ph == 0 or ph > size or pw > size:
            continue
        stroke_patch = v >= STROKE_THRESHOLD
        if stroke_patch.sum() < 4:
            continue
        inked = v > t_lo
        local_box = tight_bbox(stroke_patch)
        placed = None
        for _try in range(PLACEMENT_TRIES):
            y0 = int(rng.integers(0, size - ph + 1))
            x0 = int(rng.integers(0, size - pw + 1))
            box = [local_box[0] + x0, local_box[1] + y0, local_box[2],
                   local_box[3]]
            if _placement_ok(instances, stroke_patch, inked, y0, x0, box, img,
                             label_map):
                placed = (y0, x0)
                break
        if placed is None:
            continue
        y0, x0 = placed
        stroke = np.zeros((size, size), bool)
        stroke[y0:y0 + ph, x0:x0 + pw] = stroke_patch
        region = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        alpha = np.clip((v - t_lo) / (t_hi - t_lo), 0, 1)
        ink_colour = pick_ink_colour(
            rng, *_lum_under(img, label_map, inked, region))
        img[region] = (img[region] * (1 - alpha[..., None]) +
                       ink_colour * alpha[..., None])
        lm = label_map[region]
        lm[(v > t_lo) & (v < t_hi)] = IGNORE_INDEX
        lm[v >= t_hi] = labels[src] + 1
        for inst in instances:
            inst.visible &= ~stroke
            inst.bbox = tight_bbox(inst.visible)
        instances.append(
            DigitInstance(label=int(labels[src]), source_index=src,
                          stroke=stroke, visible=stroke.copy(),
                          bbox=tight_bbox(stroke)))

    if not instances:
        # Only degenerate (inkless) sources fail on an empty canvas; redraw
        # from the same stream so no canvas is left without a digit.
        return render_canvas(rng, settings, images, labels, pool)

    # Sensor-like noise over digits and background alike.
    sigma = rng.uniform(0, MAX_NOISE_SIGMA)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Canvas(image=image, label_map=label_map, instances=instances)


# ----------------------------------------------------------------------------
# Dataset writers
# ----------------------------------------------------------------------------
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


def _clean(root: Path, task: str) -> None:
    # Only our own outputs are removed, never the whole folder, in case a user
    # keeps something else next to them.
    names = (['train', 'val', 'annotations'] if task == 'det' else
             ['img_dir', 'ann_dir', 'sources_train.json', 'sources_val.json'])
    for name in ['meta.json'] + names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_json(path: Path, obj: dict, indent: int | None = None) -> None:
    separators = None if indent else (',', ':')
    path.write_text(json.dumps(obj, indent=indent, separators=separators) +
                    '\n')


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
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
        _save_png(canvas.image, root / split / f'{stem}.png', 1)
    else:
        _save_png(canvas.image, root / 'img_dir' / split / f'{stem}.png', 1)
        _save_png(canvas.label_map, root / 'ann_dir' / split / f'{stem}.png',
                  6)
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


def _render_split(task: str, split: str, n: int, settings: GenSettings,
                  root: Path, workers: int,
                  progress: ProgressFn | None) -> Iterator[dict]:
    # Every canvas has its own random stream, so the output does not depend on
    # the number of workers; imap keeps the records in index order.
    jobs = ((task, split, i, settings, str(root)) for i in range(n))
    if workers <= 1:
        records = map(_produce, jobs)
        pool = None
    else:
        # fork shares the loaded modules; spawn would need an importable
        # module path, which a script run as __main__ lacks on some setups.
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


class _SplitSummary:
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
            record: Output of ``_produce``.
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


def _check_disjoint(summaries: dict) -> None:
    shared = summaries['train'].sources & summaries['val'].sources
    assert not shared, f'source digits used in both splits: {sorted(shared)}'


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
    _clean(root, 'det')
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + CATEGORY_ID_OFFSET, name=name,
                       supercategory='digit')
                  for i, name in enumerate(CLASSES)]
    summaries = {}
    for split, n in (('train', settings.num_train), ('val', settings.num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        summary = summaries[split] = _SplitSummary()
        coco_images, annotations = [], []
        for i, record in enumerate(_render_split('det', split, n, settings,
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
        _write_json(root / 'annotations' / f'instances_{split}.json', coco)
    _check_disjoint(summaries)
    result = {s: v.as_dict() for s, v in summaries.items()}
    _write_json(root / 'meta.json',
                dict(settings=settings_meta('det', settings), summary=result),
                indent=2)
    return result


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
    _clean(root, 'seg')
    names = dict(enumerate(SEG_CLASSES)) | {IGNORE_INDEX: 'ignore'}
    summaries, pixels = {}, {}
    for split, n in (('train', settings.num_train), ('val', settings.num_val)):
        (root / 'img_dir' / split).mkdir(parents=True, exist_ok=True)
        (root / 'ann_dir' / split).mkdir(parents=True, exist_ok=True)
        summary = summaries[split] = _SplitSummary()
        sources = {}
        counts = np.zeros(256, np.int64)
        for i, record in enumerate(_render_split('seg', split, n, settings,
                                                 root, workers, progress)):
            summary.add(record)
            sources[f'{i:06d}'] = [[label, src] for label, src, _, _ in
                                   record['instances']]
            counts += record['pixels']
        pixels[split] = {names[k]: int(counts[k]) for k in sorted(names)}
        _write_json(root / f'sources_{split}.json', sources)
    _check_disjoint(summaries)
    result = {s: v.as_dict() | dict(pixels=pixels[s])
              for s, v in summaries.items()}
    _write_json(root / 'meta.json',
                dict(settings=settings_meta('seg', settings), summary=result),
                indent=2)
    return result


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


# ----------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------
def _seg_colours() -> np.ndarray:
    lut = np.full((256, 3), 255, np.uint8)
    lut[0] = (0, 0, 0)
    lut[1:len(CLASSES) + 1] = PALETTE
    return lut


def render_preview(settings: GenSettings, num_det: int = 12,
                   num_seg: int = 4, columns: int = 4,
                   zoom: int = 2) -> Image.Image:
    """Builds a mosaic of samples for eyeballing the data.

    Shows the first ``num_det`` training detection canvases with their boxes
    and class names, then the first ``num_seg`` training segmentation canvases
    each followed by its colourised label map (white = ignore). These are the
    same canvases the dataset files contain.

    Args:
        settings: Generation settings.
        num_det: Detection samples to show.
        num_seg: Segmentation samples to show (two tiles each).
        columns: Tiles per mosaic row.
        zoom: Integer nearest-neighbour upscaling of each tile.

    Returns:
        The RGB mosaic.
    """
    images, labels = load_source_digits()
    pool = split_sources(labels, settings.seed)[0]
    tiles = []
    for i in range(num_det):
        canvas = render_canvas(canvas_rng(settings.seed, 'det', 'train', i),
                               settings, images, labels, pool)
        tile = Image.fromarray(canvas.image).resize(
            (settings.img_size * zoom, ) * 2, Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        for inst in canvas.instances:
            x, y, w, h = inst.bbox
            colour = PALETTE[inst.label]
            draw.rectangle([x * zoom, y * zoom, (x + w) * zoom - 1,
                            (y + h) * zoom - 1], outline=colour)
            draw.text((x * zoom + 2, max(0, y * zoom - 11)),
                      CLASSES[inst.label], fill=colour, stroke_width=1,
                      stroke_fill=(0, 0, 0))
        tiles.append(tile)
    lut = _seg_colours()
    for i in range(num_seg):
        canvas = render_canvas(canvas_rng(settings.seed, 'seg', 'train', i),
                               settings, images, labels, pool)
        for array in (canvas.image, lut[canvas.label_map]):
            tiles.append(Image.fromarray(array).resize(
                (settings.img_size * zoom, ) * 2, Image.Resampling.NEAREST))
    gap, side = 4, settings.img_size * zoom
    rows = -(-len(tiles) // columns)
    mosaic = Image.new('RGB', (columns * (side + gap) + gap,
                               rows * (side + gap) + gap), (96, 96, 96))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        mosaic.paste(tile, (gap + c * (side + gap), gap + r * (side + gap)))
    return mosaic


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The parsed namespace.
    """
    parser = argparse.ArgumentParser(
        description='Build digit detection (COCO) and segmentation (mmseg '
        'folder) datasets from sklearn.datasets.load_digits().')
    d = GenSettings()
    parser.add_argument('--out', default='data', help='output root')
    parser.add_argument('--task', choices=['det', 'seg', 'both'],
                        default='both')
    parser.add_argument('--num-train', type=int, default=d.num_train)
    parser.add_argument('--num-val', type=int, default=d.num_val)
    parser.add_argument('--img-size', type=int, default=d.img_size,
                        help='canvas side in pixels')
    parser.add_argument('--min-digits', type=int, default=d.min_digits)
    parser.add_argument('--max-digits', type=int, default=d.max_digits)
    parser.add_argument('--min-scale', type=int, default=d.min_scale,
                        help='min side in pixels of an upscaled digit')
    parser.add_argument('--max-scale', type=int, default=d.max_scale,
                        help='max side in pixels of an upscaled digit')
    parser.add_argument('--seed', type=int, default=d.seed)
    parser.add_argument('--workers', type=int, default=None,
                        help='worker processes (default: available CPUs, '
                        'at most 8); does not change the output')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output is up to date')
    parser.add_argument('--preview', metavar='PATH',
                        help='also write a PNG mosaic of samples with boxes')
    return parser.parse_args(argv)


def _print_summary(task: str, result: dict) -> None:
    state = 'up to date, skipped' if result['skipped'] else 'generated'
    print(f'[{task}] {state}')
    for split, s in result['summary'].items():
        per_class = ' '.join(f'{k}:{v}' for k, v in s['per_class'].items())
        print(f'  {split}: {s["images"]} images, {s["objects"]} digits '
              f'({s["occluded"]} partly occluded, {s["sources_used"]} '
              f'distinct source digits)')
        print(f'    per class  {per_class}')
        if 'pixels' in s:
            total = sum(s['pixels'].values())
            fg = total - s['pixels']['background'] - s['pixels']['ignore']
            print(f'    pixels     {100 * fg / total:.1f}% digit, '
                  f'{100 * s["pixels"]["ignore"] / total:.1f}% ignore (255)')


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line tool.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        Process exit status.
    """
    args = parse_args(argv)
    settings = GenSettings(
        num_train=args.num_train, num_val=args.num_val,
        img_size=args.img_size, min_digits=args.min_digits,
        max_digits=args.max_digits, min_scale=args.min_scale,
        max_scale=args.max_scale, seed=args.seed)
    try:
        settings.validate()
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = generate(args.out, args.task, settings, force=args.force,
                       progress=lambda line: print(line, flush=True),
                       workers=args.workers)
    for task, result in results.items():
        _print_summary(task, result)
        print(f'  -> {task_root(args.out, task)}')
    if args.preview:
        path = Path(args.preview)
        path.parent.mkdir(parents=True, exist_ok=True)
        render_preview(settings).save(path)
        print(f'preview written to {path}')
    print(f'done in {time.perf_counter() - start:.1f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
