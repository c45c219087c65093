"""Build the stock compact models of the project from their mmdet / mmseg configs.

``mmdet::`` / ``mmseg::`` paths only resolve inside ``_base_``, so each config is
a one-line file inheriting the stock one.
"""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache

from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

STOCK_CONFIGS = {
    'yolov3_mobilenetv2': 'mmdet::yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py',
    'ssdlite_mobilenetv2': 'mmdet::ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py',
    'unet_fcn': 'mmseg::unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py',
    'fcn_mobilenetv2': 'mmseg::mobilenet_v2/mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py',
    'yolox_tiny': 'mmdet::yolox/yolox_tiny_8xb8-300e_coco.py',
    'yolox_nano': 'mmdet::yolox/yolox_nano_8xb8-300e_coco.py',  # depthwise-separable
}


def disable_pretrained(model_cfg) -> None:
    """Drop pretrained-weight loading from a model config (nothing can be downloaded)."""
    if isinstance(model_cfg, dict):
        if 'pretrained' in model_cfg:
            model_cfg['pretrained'] = None
        init_cfg = model_cfg.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            model_cfg['init_cfg'] = None
        for value in model_cfg.values():
            disable_pretrained(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            disable_pretrained(value)


@lru_cache(maxsize=None)
def stock_config(name: str) -> Config:
    """The full stock config ``name`` (a key of :data:`STOCK_CONFIGS`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{name}.py')
        with open(path, 'w') as f:
            f.write(f"_base_ = '{STOCK_CONFIGS[name]}'\n")
        return Config.fromfile(path)


def build_stock_model(name: str):
    """A freshly built (randomly initialised, pretrained loading off) stock model."""
    cfg = stock_config(name)
    model_cfg = cfg.model.copy()
    disable_pretrained(model_cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(model_cfg)
    model.init_weights()
    return model
