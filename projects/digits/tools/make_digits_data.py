"""Writes the digits detection and segmentation sets (:mod:`projects.digits.digits_data`).

    python projects/digits/tools/make_digits_data.py --out data/digits64 --img-size 64 \
        --min-scale 16 --max-scale 32 --max-digits 4

writes the 64x64 sets that the project's configs and demo read; without
options it writes the 128x128 sets of ``projects/digits/configs/_base_/datasets`` to
``data/digits_*``. ``--help`` lists every option.
"""
import os.path as osp
import sys

# The project is imported from the repository root, as OpenMMLab projects are.
REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from projects.digits.digits_data import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
