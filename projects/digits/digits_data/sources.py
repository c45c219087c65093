"""The source digits (scikit-learn's bundled 8x8 images), their split and the per-canvas seeds."""
from __future__ import annotations

import numpy as np

from .settings import CLASSES

VAL_SOURCE_FRACTION = 0.2
_TASK_IDS = {'det': 1, 'seg': 2}
_SPLIT_IDS = {'train': 1, 'val': 2}
_SPLIT_SEED_SALT = 7919


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
