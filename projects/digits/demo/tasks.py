"""What the demo compares: its two tasks, their configs and metrics, and its fixed settings."""
from __future__ import annotations

import os.path as osp
from dataclasses import dataclass, field, replace

from expand_mm.errors import ExpandMMError

from ..digits_data import DIGITS64

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
CONFIG_DIR = osp.join(REPO_ROOT, 'projects', 'digits', 'configs', 'digits')


@dataclass(frozen=True)
class TaskSpec:
    """One task of the demo: a compact config, its ExpandNet config and the metric.

    Attributes:
        name: ``'det'`` or ``'seg'``.
        title: Human-readable task name.
        compact_config: Path of the compact model's config.
        expandnet_config: Path of its ExpandNet-CL r=4 config.
        metric_key: Key of the headline metric in ``Runner.test()``'s result.
        metric_name: Short name of the metric for tables.
        metric_scale: Factor that turns the metric into percent.
        extra_keys: Further metrics reported (key -> name), same scale.
    """

    name: str
    title: str
    compact_config: str
    expandnet_config: str
    metric_key: str
    metric_name: str
    metric_scale: float
    extra_keys: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    'det': TaskSpec(
        name='det', title='digit detection (YOLO-LITE-style detector)',
        compact_config=osp.join(CONFIG_DIR, 'yolo-lite_1xb16-900i_digits-det-64x64.py'),
        expandnet_config=osp.join(
            CONFIG_DIR, 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'),
        metric_key='coco/bbox_mAP', metric_name='mAP', metric_scale=100.0,
        extra_keys={'coco/bbox_mAP_50': 'mAP50'}),
    'seg': TaskSpec(
        name='seg', title='digit segmentation (U-Net S4-D16, 16 channels)',
        compact_config=osp.join(CONFIG_DIR,
                                'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'),
        expandnet_config=osp.join(
            CONFIG_DIR, 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'),
        metric_key='mIoU', metric_name='mIoU', metric_scale=1.0,
        extra_keys={'aAcc': 'aAcc'}),
}
VARIANTS = ('compact', 'expandnet')
# Progress steps per task: train both variants, evaluate both, time and draw.
STEPS_PER_TASK = 2 * len(VARIANTS) + 1
VARIANT_TITLES = {'compact': 'compact', 'expandnet': 'ExpandNet-CL r=4 → contracted'}

# The demo's data: the 64x64 sets of the project's configs (data/digits64).
DEMO_DATA = DIGITS64
# --quick: a smoke test of the whole path. Tiny data, a few iterations, small
# batches and no loader workers (their start-up would dominate).
QUICK_DATA = replace(DEMO_DATA, num_train=24, num_val=8)
QUICK_ITERS = 6
QUICK_BATCH = 4
# Inference time: images timed per model (interleaved rounds, median).
TIMING_IMAGES = 20
TIMING_IMAGES_QUICK = 4
PREDICTION_IMAGES = 4
DET_SCORE_THR = 0.3


class DemoError(ExpandMMError, RuntimeError):
    """A run of the demo did not give what the comparison needs (says what is missing)."""
