"""Session fixtures shared by the test modules: tiny datasets and stock models.

Each is made once per session. The datasets are only read by the tests (they
train and test on them; every work dir lives in the test's own ``tmp_path``).
The stock models are handed out as private copies, so a test may expand,
contract or train the one it gets.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from data_factory import make_cityscapes, make_voc
from stock_models import build_stock_model


@pytest.fixture(scope='session', autouse=True)
def format_each_config_text_once():
    """Formats each config text with yapf once per session.

    ``Config.pretty_text`` runs yapf on the whole config (about a second), and a
    Runner asks for it again and again: the logged config, the dumped file and
    the visualizer's copy when it is built, then the run's metainfo and every
    checkpoint's meta. yapf's output depends on the text and the style alone,
    so the same text is formatted once and every caller still gets exactly
    what yapf returns.
    """
    import mmengine.config.config as mm_config
    format_code = mm_config.FormatCode

    @functools.lru_cache(maxsize=256)
    def formatted(text: str, options: tuple) -> tuple[str, bool]:
        options = dict(options)
        return format_code(text, style_config=dict(options.pop('style_config')), **options)

    def cached_format_code(text, style_config=None, **kwargs):
        if not isinstance(style_config, dict):
            return format_code(text, style_config=style_config, **kwargs)
        options = dict(kwargs, style_config=tuple(sorted(style_config.items())))
        return formatted(text, tuple(sorted(options.items())))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mm_config, 'FormatCode', cached_format_code)
        yield


def _manager_classes() -> list[type]:
    """Every class that keeps MMEngine's global, by-name instances."""
    from mmengine.utils.manager import ManagerMixin
    found, pending = [], [ManagerMixin]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.fixture(autouse=True)
def forget_instances_a_test_made():
    """Drops the visualizers, message hubs and loggers a test's Runners made.

    MMEngine keeps them by name for the whole process, and mmdet's / mmseg's
    configs name their visualizer ``'visualizer'``: every later Runner is handed
    the first one's, which still writes under the earlier test's work dir -- a
    folder pytest removes once that test has passed.
    """
    before = {cls: set(cls._instance_dict) for cls in _manager_classes()}
    yield
    # Classes imported during the test (mmdet's visualizer, say) count too.
    for cls in _manager_classes():
        for name in set(cls._instance_dict) - before.get(cls, set()):
            cls._instance_dict.pop(name, None)


@pytest.fixture(scope='session')
def digits_data(tmp_path_factory) -> Path:
    """Both tiny digits datasets (``digits_det``, ``digits_seg``) under one root."""
    from wrapper_test_utils import make_digits
    return make_digits(tmp_path_factory.mktemp('digits'))


@pytest.fixture(scope='session')
def voc_root(tmp_path_factory) -> str:
    """A VOCdevkit tree (VOC2007 and VOC2012, 3 images of 96x96 each), ending in '/'."""
    root = tmp_path_factory.mktemp('voc')
    make_voc(str(root), num_images=3, size=96)
    return f'{root}/'


@pytest.fixture(scope='session')
def cityscapes_root(tmp_path_factory) -> str:
    """A Cityscapes tree (2 train and 2 val images of 64x128), ending in '/'."""
    root = tmp_path_factory.mktemp('cityscapes')
    make_cityscapes(str(root), num_images=2, size=(64, 128))
    return f'{root}/'


@pytest.fixture(scope='session')
def stock_model() -> Callable[[str], nn.Module]:
    """``stock_model(name)``: a private copy of the stock model ``name`` (a key of
    ``stock_models.STOCK_CONFIGS``), built once per session.

    Each is built right after ``torch.manual_seed(0)``, and every call leaves
    torch's random state where that build left it, so what a test draws next
    is what it would draw after ``torch.manual_seed(0); build_stock_model(name)``.
    """
    built: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def fresh(name: str) -> nn.Module:
        if name not in built:
            torch.manual_seed(0)
            model = build_stock_model(name)
            built[name] = (model, torch.get_rng_state())
        model, rng_state = built[name]
        torch.set_rng_state(rng_state)
        return copy.deepcopy(model)

    return fresh


def pytest_report_header(config) -> str:
    """Reports the free disk under pytest's temporary root, the resource a full
    run most often lacks (each slow test writes up to about 3 GB there)."""
    import shutil
    import tempfile
    root = Path(tempfile.gettempdir())
    free_gib = shutil.disk_usage(root).free / 2**30
    return f'expand_mm: {free_gib:.1f} GiB free under {root}'
