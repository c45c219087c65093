"""Rendering one canvas: a textured background, digits that stay legible, and its label map.

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
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .settings import IGNORE_INDEX, GenSettings

STROKE_THRESHOLD = 0.4
EDGE_BAND = 0.1
MIN_VISIBLE = 0.7
MAX_BOX_IOU = 0.45
# Intersection over the smaller box: stops a small digit sitting inside a large
# one, which IoU alone lets through.
MAX_BOX_CONTAINMENT = 0.65
MAX_ROTATION_DEG = 15.0
MAX_ASPECT_JITTER = 0.1
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

_LUMA = (0.299, 0.587, 0.114)


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
