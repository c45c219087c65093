"""What the digits sets are: their classes, format constants and the settings that make them."""
from __future__ import annotations

from dataclasses import dataclass

CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
SEG_CLASSES: tuple[str, ...] = ('background', ) + CLASSES
# COCO category ids start at 1 by convention; mmdet's CocoDataset maps them to
# labels through the category *names*, in the order the categories are listed.
CATEGORY_ID_OFFSET = 1
IGNORE_INDEX = 255

# Bump when the rendering changes so cached datasets are regenerated.
GENERATOR_VERSION = 1

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
