"""A mosaic of the first canvases with their boxes and label maps, for eyeballing the data."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .render import render_canvas
from .settings import CLASSES, PALETTE, GenSettings
from .sources import canvas_rng, load_source_digits, split_sources


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
