"""Shared by the training-time wrapper tests: tiny digits data, configs, stock models."""
from __future__ import annotations

import importlib.util
import os.path as osp
import sys
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from mm_test_utils import load_config, shrink_for_test

ROOT = Path(__file__).resolve().parents[1]
DET_COMPACT = ROOT / 'projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py'
SEG_COMPACT = ROOT / ('projects/digits/configs/digits/'
                      'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py')
SIZE = (64, 64)


def load_tool(name: str):
    """Import ``tools/<name>.py`` (tools/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_digits(root: Path) -> Path:
    """Both digits datasets, tiny (4 train / 2 val 64x64 canvases), under ``root``."""
    from projects.digits import digits_data as mdd
    settings = mdd.GenSettings(num_train=4, num_val=2, img_size=64, min_digits=1,
                               max_digits=2, min_scale=16, max_scale=32, seed=0)
    mdd.generate(root, 'both', settings, workers=1)
    return root


def tiny_cfg(config: Path | str, data: Path, work_dir: Path, task: str,
             max_iters: int = 2) -> Config:
    """``config`` shrunk to 2 iterations on the tiny digits data of ``task``."""
    cfg = load_config(config)
    shrink_for_test(cfg, str(work_dir), str(data / f'digits_{task}') + '/', SIZE, max_iters)
    return cfg


def build_model(config: Path | str, **overrides):
    """The model of ``config`` built as the Runner builds it, in its scope."""
    cfg = load_config(config)
    model_cfg = cfg.model.copy()
    model_cfg.update(overrides)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(model_cfg)


def save_state(model: torch.nn.Module, path: Path) -> str:
    """Write ``model``'s weights as a minimal MMEngine checkpoint."""
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


def assert_outputs_close(a, b, rtol: float = 1e-4) -> None:
    """Nested tensor outputs equal up to ``rtol`` of their largest magnitude."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(a.abs().max() + 1e-12))
        return
    assert isinstance(a, (list, tuple)) and len(a) == len(b)
    for x, y in zip(a, b):
        assert_outputs_close(x, y, rtol)


def logged(runner, key: str) -> float:
    """The last logged value of ``train/<key>``."""
    return float(runner.message_hub.get_scalar(f'train/{key}').current())


def compact_checkpoint(work_dir: Path, it: int = 2) -> dict:
    """The state dict of ``iter_<it>_compact.pth``."""
    path = osp.join(work_dir, f'iter_{it}_compact.pth')
    assert osp.isfile(path), path
    return torch.load(path)['state_dict']


def load_stock(config: Path | str, compact: dict) -> torch.nn.Module:
    """The stock model of ``config`` with ``compact`` loaded strictly, in eval mode."""
    model = build_model(config)
    model.load_state_dict(compact, strict=True)
    return model.eval()


def assert_same_raw_outputs(stock: torch.nn.Module, *models: torch.nn.Module,
                            rtol: float = 1e-4) -> None:
    """``mode='tensor'`` outputs of every model in eval mode equal ``stock``'s on one image."""
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        expected = stock.eval()(x, mode='tensor')
        for model in models:
            assert_outputs_close(expected, model.eval()(x, mode='tensor'), rtol)
