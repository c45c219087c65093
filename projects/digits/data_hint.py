"""Names the command that writes the digits data when a digits config's data is missing.

The digits configs list this module in ``custom_imports``: importing it
registers :func:`digits_data_hint` with expand_mm's missing-data check, so
``tools/train.py``, ``tools/test.py`` and the analysis tools end with the
command instead of a bare "does not exist".
"""
from __future__ import annotations

import os.path as osp

from expand_mm.datasets_check import register_dataset_hint

from .digits_data.presets import DIGITS64, data_command
from .digits_data.settings import GenSettings

DATASET_FOLDERS = ('digits_det', 'digits_seg')


def digits_data_hint(data_root: str) -> str | None:
    """How to write the digits set that ``data_root`` points at.

    Args:
        data_root: A dataset's ``data_root``; a digits set ends in
            ``digits_det`` or ``digits_seg``. Under a ``digits64`` folder it
            is the 64x64 set of the project's configs, else the generator's
            defaults.

    Returns:
        The command to run, or None if ``data_root`` is not a digits set.
    """
    root = data_root.rstrip('/')
    if osp.basename(root) not in DATASET_FOLDERS:
        return None
    out = osp.dirname(root) or '.'
    if 'digits64' in out:
        return ("the digits set is drawn from scikit-learn's bundled digits: run "
                f'`{data_command(out, DIGITS64)}` (projects/digits/tools/demo.py also '
                'writes it when missing)')
    return ("the digits set is drawn from scikit-learn's bundled digits: run "
            f'`{data_command(out, GenSettings())}`')


register_dataset_hint(digits_data_hint)
