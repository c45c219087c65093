"""Small detection and segmentation datasets from scikit-learn's digits.

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

The train/val split is made over the *source* 8x8 images (stratified by
class), so no source image appears in both splits. How a canvas is drawn
(strokes, occlusion, label maps) is defined in :mod:`.render`.

Usage::

    python projects/digits/tools/make_digits_data.py                 # both tasks, defaults
    python projects/digits/tools/make_digits_data.py --task det --num-train 200 --num-val 50
    python projects/digits/tools/make_digits_data.py --preview work_dirs/digits_preview.png

or from Python (with the repository root on ``sys.path``)::

    from projects.digits.digits_data import DIGITS64, generate
    generate('data/digits64', 'both', DIGITS64)

Generation is spread over ``--workers`` processes (default: available CPUs,
at most 8); every canvas has its own seeded random stream, so the files are
byte-identical whatever the worker count.

Modules: :mod:`.settings` (classes, format constants, ``GenSettings``),
:mod:`.sources` (the source digits and their split), :mod:`.render` (one
canvas), :mod:`.writing` (what both writers share), :mod:`.det` and
:mod:`.seg` (the two writers), :mod:`.dataset` (both on request),
:mod:`.preview`, :mod:`.presets` (the project's sets and their commands) and
:mod:`.cli`.
"""
from .cli import main, parse_args
from .dataset import generate
from .det import generate_det
from .preview import render_preview
from .presets import DIGITS64, TOOL, data_command
from .render import (EDGE_BAND, MIN_VISIBLE, STROKE_THRESHOLD, Canvas, DigitInstance,
                     render_canvas, render_digit)
from .seg import generate_seg
from .settings import (CATEGORY_ID_OFFSET, CLASSES, GENERATOR_VERSION, IGNORE_INDEX, PALETTE,
                       SEG_CLASSES, GenSettings)
from .sources import canvas_rng, load_source_digits, split_sources
from .writing import default_workers, is_up_to_date, settings_meta, task_root

__all__ = [
    'CATEGORY_ID_OFFSET', 'CLASSES', 'DIGITS64', 'EDGE_BAND', 'GENERATOR_VERSION',
    'IGNORE_INDEX', 'MIN_VISIBLE', 'PALETTE', 'SEG_CLASSES', 'STROKE_THRESHOLD', 'TOOL',
    'Canvas', 'DigitInstance', 'GenSettings', 'canvas_rng', 'data_command', 'default_workers',
    'generate', 'generate_det', 'generate_seg', 'is_up_to_date', 'load_source_digits', 'main',
    'parse_args', 'render_canvas', 'render_digit', 'render_preview', 'settings_meta',
    'split_sources', 'task_root'
]
