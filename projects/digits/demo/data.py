"""The demo's data: the 64x64 digits sets, generated when missing or out of date."""
from __future__ import annotations

import os.path as osp
import time
from typing import Any, Sequence

from mmengine.logging import MMLogger

from .. import digits_data
from .tasks import DEMO_DATA, QUICK_DATA


def data_settings(data_root: str, quick: bool) -> tuple[str, digits_data.GenSettings]:
    """Where the demo's data sets go and the generator settings that make them.

    Args:
        data_root: The ``--data-root`` argument.
        quick: The tiny smoke-test sets.

    Returns:
        ``(out, settings)``: the generator's output root and its ``GenSettings``.
    """
    if quick:
        return osp.join(data_root, 'quick'), QUICK_DATA
    return data_root, DEMO_DATA


def ensure_data(data_root: str, tasks: Sequence[str], quick: bool,
                logger: MMLogger) -> dict[str, Any]:
    """Generates the digits data sets that are missing or out of date.

    The demo's settings are :data:`DEMO_DATA` (2,000 train / 500 val canvases
    of 64x64); ``quick`` uses a tiny set under ``data_root/quick``. The data
    seed stays the generator's default whatever the demo's (training) seed is:
    the data set is fixed.

    Args:
        data_root: Root holding ``digits_det/`` and ``digits_seg/``.
        tasks: ``'det'`` and / or ``'seg'``.
        quick: Use the tiny set.
        logger: Where progress goes.

    Returns:
        ``out`` (generator output root), ``roots`` (task -> dataset root),
        ``settings``, ``up_to_date`` (nothing had to be generated), ``seconds``
        and ``command`` (the equivalent ``make_digits_data.py`` command).
    """
    out, settings = data_settings(data_root, quick)
    start = time.perf_counter()
    roots, generated = {}, False
    for task in tasks:
        root = str(digits_data.task_root(out, task))
        if digits_data.is_up_to_date(out, task, settings):
            logger.info(f'data: {root} is up to date')
        else:
            logger.info(f'data: generating {root} ({settings.num_train} train / '
                        f'{settings.num_val} val canvases of {settings.img_size}x'
                        f'{settings.img_size}; about 20 s per task at full size)')
            digits_data.generate(out, task, settings, progress=logger.info)
            generated = True
        roots[task] = root
    return dict(out=out, roots=roots, settings=settings, up_to_date=not generated,
                seconds=time.perf_counter() - start,
                command=digits_data.data_command(out, settings))
