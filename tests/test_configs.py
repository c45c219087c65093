"""Every user config under ``configs/`` parses, builds on CPU and runs.

For each config (``_base_`` files excluded; the digits project's configs under
``projects/digits/configs`` have tests of their own) the model
is built once as MMEngine's Runner builds it (the top-level
``data_preprocessor`` added to the model dict), with pretrained-weight loading
switched off (nothing can be downloaded here), in the config's default scope,
and run in ``mode='tensor'`` on a 1x3x64x64 image. ExpandNet configs are
checked against their compact counterpart -- the config they inherit -- which
must exist: same embedded model config, same output shapes, same parameter
count before expansion, more after.
The ``YOLOLite`` backbone gets a few direct tests at the end.
"""
from __future__ import annotations

import ast
import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import MODELS, DefaultScope
from torch import nn

import expand_mm
from expand_mm.models.backbones import YOLOLite

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO_ROOT / 'configs'
DIGITS_CONFIG_ROOT = REPO_ROOT / 'projects/digits/configs'
INPUT_SIZE = 64
EXPANDNET_NAME = re.compile(r'^expandnet-(?P<strategy>c[lk])-r(?P<ratio>\d+)_'
                            r'(?P<model>[^_]+)_(?P<schedule>[^_]+)_(?P<dataset>[^_]+)$')
# Classes per dataset (the last field of an OpenMMLab config name).
NUM_CLASSES = {'coco': 80, 'voc0712': 20, 'cityscapes-512x1024': 19}
# Output stride of the decode head's logits for each segmentation backbone.
SEG_OUTPUT_STRIDE = {'UNet': 1, 'MobileNetV2': 8}
# expand_mm's hooks in every ExpandNet / training-wrapper config: default_hooks key -> type.
EXPAND_MM_HOOKS = {'expand_load': 'ExpandCheckpointLoadHook',
                   'expand_contract': 'ContractCheckpointHook',
                   'expand_check': 'ExpandNetCheckHook'}


def _user_configs() -> list[Path]:
    paths = []
    for path in sorted(CONFIG_ROOT.rglob('*.py')):
        if '_base_' in path.relative_to(CONFIG_ROOT).parts:
            continue
        if path.parent.name == 'planting':  # a teacher to fetch: tests/test_planting_search.py
            continue
        paths.append(path)
    return paths


CONFIGS = _user_configs()
EXPANDNET_CONFIGS = [p for p in CONFIGS if p.name.startswith('expandnet-')]
# Training-time wrappers around a compact config (an auxiliary network).
WRAPPER_CONFIGS = [p for p in CONFIGS if p.parent.name == 'aux_overparam']
COMPACT_CONFIGS = [p for p in CONFIGS if p not in EXPANDNET_CONFIGS + WRAPPER_CONFIGS]


def _id(path: Path) -> str:
    root = DIGITS_CONFIG_ROOT if path.is_relative_to(DIGITS_CONFIG_ROOT) else CONFIG_ROOT
    return str(path.relative_to(root))


def disable_pretrained(cfg: Any) -> None:
    """Switch off every pretrained-weight load in a model config, in place.

    ``pretrained=...`` becomes ``None`` and ``init_cfg``s of type ``Pretrained``
    are dropped (also inside lists), at any depth -- the config embedded in an
    ``ExpandNet`` model included.
    """
    if isinstance(cfg, dict):
        if cfg.get('pretrained') is not None:
            cfg['pretrained'] = None
        init_cfg = cfg.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            cfg['init_cfg'] = None
        elif isinstance(init_cfg, list):
            cfg['init_cfg'] = [c for c in init_cfg
                               if not (isinstance(c, dict) and c.get('type') == 'Pretrained')]
        for value in cfg.values():
            disable_pretrained(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            disable_pretrained(value)


def _has_pretrained(cfg: Any) -> bool:
    if isinstance(cfg, dict):
        init_cfg = cfg.get('init_cfg')
        inits = init_cfg if isinstance(init_cfg, list) else [init_cfg]
        if cfg.get('pretrained') is not None or any(
                isinstance(c, dict) and c.get('type') == 'Pretrained' for c in inits):
            return True
        return any(_has_pretrained(v) for v in cfg.values())
    if isinstance(cfg, (list, tuple)):
        return any(_has_pretrained(v) for v in cfg)
    return False


def _base_of(path: Path) -> str | list[str]:
    """The literal ``_base_`` of a config file (``Config`` drops it)."""
    for node in ast.parse(path.read_text()).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], 'id', None) == '_base_'):
            return ast.literal_eval(node.value)
    raise AssertionError(f'{path} has no _base_')


@lru_cache(maxsize=None)
def load(path: Path) -> Config:
    return Config.fromfile(str(path))


class Built:
    """A config's model, built once, with its tensor-mode outputs on one image."""

    def __init__(self, path: Path) -> None:
        self.cfg = load(path)
        model_cfg = copy.deepcopy(self.cfg.model)
        disable_pretrained(model_cfg)
        # as MMEngine's Runner does: the top-level data_preprocessor joins the model dict
        if self.cfg.get('data_preprocessor') is not None:
            model_cfg.setdefault('data_preprocessor', copy.deepcopy(self.cfg.data_preprocessor))
        assert not _has_pretrained(model_cfg)
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope(self.cfg.default_scope):
            self.model = MODELS.build(model_cfg)
            self.model.init_weights()
        self.model.eval()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.inputs = torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE)
        with torch.no_grad():
            self.outputs = self.model(self.inputs, mode='tensor')
        self.tensors = _flatten(self.outputs)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    assert isinstance(out, (list, tuple)), f'unexpected output type {type(out)}'
    return [t for o in out for t in _flatten(o)]


@lru_cache(maxsize=None)
def built(path: Path) -> Built:
    return Built(path)


def _compact_path(path: Path) -> Path:
    base = _base_of(path)
    assert isinstance(base, str) and base.startswith('../'), (
        f'{path.name}: _base_ must be the compact config, a local path, got {base!r}')
    return (path.parent / base).resolve()


def _count_kxk_convs(model: nn.Module) -> int:
    return sum(1 for m in model.modules()
               if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)


# ---------------------------------------------------------------- all configs

def test_the_config_set_is_complete():
    names = {p.stem for p in CONFIGS}
    for compact in ('yolov3_mobilenetv2_8xb24-320-300e_coco',
                    'yolov3_mobilenetv2_8xb24-320-300e_voc0712',
                    'ssdlite_mobilenetv2-scratch_8xb24-600e_coco',
                    'ssdlite_mobilenetv2-scratch_8xb24-600e_voc0712',
                    'yolo-lite_8xb16-100e_voc0712',
                    'unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024',
                    'mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024',
                    'yolox_tiny_8xb8-300e_coco'):
        assert compact in names
        fields = compact.split('_')
        expandnet = 'expandnet-cl-r4_' + '-'.join(fields[:-2]) + '_' + '_'.join(fields[-2:])
        assert expandnet in names
    assert 'expandnet-ck-r4_yolo-lite-k5_8xb16-100e_voc0712' in names
    # every compact config is the base of at least one ExpandNet config
    bases = {_compact_path(p) for p in EXPANDNET_CONFIGS}
    assert set(COMPACT_CONFIGS) <= bases, set(COMPACT_CONFIGS) - bases


@pytest.mark.parametrize('path', CONFIGS, ids=_id)
@pytest.mark.slow
def test_config_builds_and_runs(path: Path):
    b = built(path)
    cfg = b.cfg
    inner = expand_mm.models.compact_model_cfg(cfg.model)
    net = expand_mm.models.deployable_model(b.model)  # a wrapper's compact network
    assert type(net).__name__ == inner['type']
    assert b.tensors and all(torch.isfinite(t).all() for t in b.tensors)
    num_classes = NUM_CLASSES[path.stem.split('_')[-1]]

    if 'bbox_head' in inner:  # detector: (per-level maps) from the head
        head = net.bbox_head
        assert head.num_classes == num_classes
        assert cfg.default_scope == 'mmdet'
        if inner['type'] == 'YOLOV3':
            (pred_maps,) = b.outputs
            assert [tuple(t.shape) for t in pred_maps] == [
                (1, head.num_base_priors * (5 + num_classes), INPUT_SIZE // s, INPUT_SIZE // s)
                for s in head.featmap_strides]
        elif inner['type'] == 'YOLOX':  # class scores, boxes, objectness for 3 levels
            cls_scores, bbox_preds, objectnesses = b.outputs
            assert len(cls_scores) == len(head.strides) == 3
            for stride, cls, box, obj in zip(head.strides, cls_scores, bbox_preds,
                                             objectnesses):
                size = INPUT_SIZE // stride
                assert tuple(cls.shape) == (1, num_classes, size, size)
                assert tuple(box.shape) == (1, 4, size, size)
                assert tuple(obj.shape) == (1, 1, size, size)
        else:  # SSD: class scores and box deltas for 6 levels
            cls_scores, bbox_preds = b.outputs
            assert len(cls_scores) == len(bbox_preds) == 6
            for n, cls, box in zip(head.num_base_priors, cls_scores, bbox_preds):
                assert cls.shape[:2] == (1, n * (num_classes + 1))
                assert box.shape[:2] == (1, n * 4)
                assert cls.shape[2:] == box.shape[2:]
            assert cls_scores[0].shape[-1] == INPUT_SIZE // 16
    else:  # segmentor: decode-head logits
        assert cfg.default_scope == 'mmseg'
        assert net.decode_head.num_classes == num_classes
        stride = SEG_OUTPUT_STRIDE[inner['backbone']['type']]
        assert b.outputs.shape == (1, num_classes, INPUT_SIZE // stride, INPUT_SIZE // stride)


# --------------------------------------------------------- ExpandNet configs

@pytest.mark.parametrize('path', EXPANDNET_CONFIGS, ids=_id)
@pytest.mark.slow
def test_expandnet_config_matches_its_compact_counterpart(path: Path):
    compact_path = _compact_path(path)
    assert compact_path.is_file(), f'{path.name}: compact counterpart {compact_path} missing'
    assert compact_path in COMPACT_CONFIGS

    # name: expandnet-{cl|ck}-r{ratio}_{compact model}_{same schedule}_{same dataset}
    m = EXPANDNET_NAME.match(path.stem)
    assert m, f'{path.name} does not follow expandnet-<cl|ck>-r<ratio>_<model>_<sched>_<data>'
    fields = compact_path.stem.split('_')
    assert m['model'] == '-'.join(fields[:-2])
    assert (m['schedule'], m['dataset']) == tuple(fields[-2:])

    cfg, compact_cfg = load(path), load(compact_path)
    assert cfg.model.type == 'ExpandNet'
    assert cfg.model.ratio == int(m['ratio'])
    assert cfg.model.strategy in (('cl',) if m['strategy'] == 'cl' else ('ck', 'auto'))
    assert cfg.model.mode == 'online'
    assert 'expand_mm' in cfg.custom_imports.imports
    # the compact model is embedded unchanged, and the rest of the config too
    assert cfg.model.model.to_dict() == compact_cfg.model.to_dict()
    for key in ('train_dataloader', 'val_dataloader', 'param_scheduler', 'train_cfg',
                'default_scope'):
        assert cfg[key] == compact_cfg[key], key
    # the same optimizer, built by the constructor that scales the factors' rates
    optim_wrapper = cfg.optim_wrapper.to_dict()
    assert optim_wrapper.pop('constructor') == 'ExpandNetOptimWrapperConstructor'
    assert optim_wrapper == compact_cfg.optim_wrapper.to_dict()
    # expand_mm's hooks under keys of their own; the base's hooks, default and custom, as
    # they are
    assert {key: cfg.default_hooks[key].type for key in EXPAND_MM_HOOKS} == EXPAND_MM_HOOKS
    # and the kill-safe checkpoint hook with the base's settings, and RNGStateHook
    assert cfg.default_hooks.rng_state.type == 'RNGStateHook'
    base_hooks = compact_cfg.default_hooks.to_dict()
    base_hooks['checkpoint']['type'] = 'SafeCheckpointHook'
    assert {key: hook for key, hook in cfg.default_hooks.items()
            if key not in {*EXPAND_MM_HOOKS, 'rng_state'}} == base_hooks
    assert cfg.get('custom_hooks') == compact_cfg.get('custom_hooks')

    b, c = built(path), built(compact_path)
    layers = expand_mm.expanded_layers(b.model)
    report = expand_mm.models.expansion_report(b.model)
    assert layers and report is not None
    assert len(report.layers) == len(layers) == _count_kxk_convs(c.model)
    assert report.model_params_before == c.num_params
    assert report.model_params_after == b.num_params
    assert report.param_ratio > 1
    assert all(r.expanded_params > r.compact_params for r in report.layers)
    assert report.ratio == cfg.model.ratio
    strategies = {r.strategy for r in report.layers}
    if cfg.model.strategy == 'cl':
        assert strategies == {'cl'}
    else:  # 'auto' on the 5x5 YOLO-LITE: CK on the backbone, CL on neck and head
        ck = [r.path for r in report.layers if r.strategy == 'ck']
        assert ck and all(p.startswith('backbone.') for p in ck)
    assert [t.shape for t in b.tensors] == [t.shape for t in c.tensors]


DIGITS_CONFIGS = [p for p in sorted(DIGITS_CONFIG_ROOT.rglob('*.py')) if '_base_' not in p.parts]


@pytest.mark.parametrize('path', CONFIGS + DIGITS_CONFIGS, ids=_id)
def test_expand_mm_hooks_sit_in_default_hooks_and_the_bases_hooks_stay(path: Path):
    """default_hooks merges into the base's dict where custom_hooks would replace its list:
    an ExpandNet or training-wrapper config has expand_mm's hooks each under its key, a
    compact config has none, and every custom hook of a config's _base_ is still there."""
    from expand_mm.checks import _base_custom_hook_types
    cfg = load(path)
    ours = {key: cfg.default_hooks[key].type for key in EXPAND_MM_HOOKS
            if key in cfg.get('default_hooks', {})}
    trains_expanded = expand_mm.models.compact_model_cfg(cfg.model) is not cfg.model
    assert ours == (EXPAND_MM_HOOKS if trains_expanded else {})
    custom = [hook.type for hook in cfg.get('custom_hooks', [])]
    assert not set(custom) & set(EXPAND_MM_HOOKS.values())
    for base, names in _base_custom_hook_types(str(path)).items():
        assert set(names) <= set(custom), f'{base}: {names} dropped'


@pytest.mark.parametrize('path', [p for p in EXPANDNET_CONFIGS if 'yolo-lite' in p.stem],
                         ids=_id)
@pytest.mark.slow
def test_yolo_lite_expandnet_contracts_into_its_compact_config(path: Path):
    b, c = built(path), built(_compact_path(path))
    compact = expand_mm.contract_model(
        b.model, verify_inputs=b.inputs, forward_fn=lambda m, x: m(x, mode='tensor'))
    assert not expand_mm.expanded_layers(compact)
    # the contracted weights load strictly into the model of the compact config
    state = compact.state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in c.model.state_dict().items()}
    fresh = copy.deepcopy(c.model)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        ys = _flatten(fresh(b.inputs, mode='tensor'))
    for y, yb in zip(ys, b.tensors):
        torch.testing.assert_close(y, yb, rtol=1e-4, atol=1e-4 * yb.abs().max().item())


def _training_batch(b: Built, size: int = 2) -> dict:
    """64x64 images with one ground-truth box / a random label map each, as a Runner feeds
    them (two: SSDLite's last BN sees 1x1 maps)."""
    batch = [_training_sample(b) for _ in range(size)]
    return dict(inputs=[img for img, _ in batch], data_samples=[s for _, s in batch])


def _training_sample(b: Built) -> tuple:
    img = torch.randint(0, 256, (3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    if b.cfg.default_scope == 'mmdet':
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        sample = DetDataSample(metainfo=dict(img_shape=(INPUT_SIZE, INPUT_SIZE),
                                             ori_shape=(INPUT_SIZE, INPUT_SIZE),
                                             pad_shape=(INPUT_SIZE, INPUT_SIZE),
                                             scale_factor=(1.0, 1.0), batch_input_shape=(
                                                 INPUT_SIZE, INPUT_SIZE)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[8., 8., 40., 48.]]),
                                           labels=torch.tensor([1]))
    else:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=dict(img_shape=(INPUT_SIZE, INPUT_SIZE),
                                             ori_shape=(INPUT_SIZE, INPUT_SIZE),
                                             pad_shape=(INPUT_SIZE, INPUT_SIZE)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, expand_mm.models.deployable_model(b.model).decode_head.num_classes,
            (1, INPUT_SIZE, INPUT_SIZE)))
    return img, sample


# Configs that train without a teacher: the ExpandNet and auxiliary-network configs, and
# the digits ExpandNet and auxiliary-head configs that set the DDP wrapper too.
TEACHERLESS_TRAINING_CONFIGS = EXPANDNET_CONFIGS + WRAPPER_CONFIGS + sorted(
    (DIGITS_CONFIG_ROOT / 'digits').glob('expandnet-*.py')) + sorted(
    (DIGITS_CONFIG_ROOT / 'aux').glob('*.py'))


@pytest.mark.parametrize('path', TEACHERLESS_TRAINING_CONFIGS, ids=_id)
@pytest.mark.slow
def test_ddp_wrapper_setting_fits_the_model(path: Path):
    """Every ExpandNet config trains under ``ExpandNetDistributedDataParallel``; one
    whose model gives some trainable parameter no gradient in a training step
    sets ``static_graph=True`` (DDP would otherwise fail at the end of the first
    backward), the others do not need it."""
    b = built(path)
    wrapper = b.cfg.get('model_wrapper_cfg')
    model = b.model.train()
    torch.manual_seed(0)
    # YOLOX's batch resize reads the runner's iteration from the message hub.
    MessageHub.get_current_instance().update_info('iter', 0)
    data = model.data_preprocessor(_training_batch(b), training=True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    model.zero_grad(set_to_none=True)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    assert wrapper is not None and wrapper.type == 'ExpandNetDistributedDataParallel'
    assert not wrapper.get('find_unused_parameters')
    # static_graph=True exactly where some parameter gets no gradient
    assert bool(wrapper.get('static_graph')) == bool(unused), (path.name, unused)
    assert set(wrapper) <= {'type', 'static_graph'}
    if 'yolov3' in path.stem:  # MobileNetV2's last 1x1 conv
        assert unused and all(n.startswith(('backbone.conv2.', 'model.backbone.conv2.'))
                              for n in unused), unused


# ------------------------------------------------------------------ YOLOLite

def test_yolo_lite_default_architecture():
    net = YOLOLite().eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None
               for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 5
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1
               for m in net.modules()) == 6
    assert sum(p.numel() for p in net.parameters()) == (
        sum(c.weight.numel() for c in convs) + 2 * sum(c.out_channels for c in convs))
    assert net.out_channels == (128, 128, 256) and net.out_strides == (8, 16, 32)
    with torch.no_grad():
        outs = net(torch.rand(2, 3, 224, 160))
    assert [tuple(o.shape) for o in outs] == [
        (2, 128, 28, 20), (2, 128, 14, 10), (2, 256, 7, 5)]


def test_yolo_lite_per_stage_kernels_and_options():
    net = YOLOLite(in_channels=1, widths=(8, 16, 24), kernel_size=(5, 3, 1), out_indices=(0, 2),
                   norm_cfg=None, act_cfg=dict(type='ReLU'))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [5, 3, 1]
    assert [c.padding[0] for c in convs] == [2, 1, 0]
    assert all(c.bias is not None for c in convs)  # no norm -> conv bias
    outs = net(torch.rand(1, 1, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 16), (1, 24, 4, 4)]


@pytest.mark.parametrize('kwargs, match', [
    (dict(kernel_size=4), 'odd'),
    (dict(kernel_size=(3, 3)), 'one int or one'),
    (dict(out_indices=(5, 3)), 'increasing'),
    (dict(out_indices=(6,)), r'\[0, 5\]'),
    (dict(widths=()), 'non-empty'),
])
def test_yolo_lite_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        YOLOLite(**kwargs)


def test_yolo_lite_is_registered_in_the_root_registry_for_both_scopes():
    for scope in ('mmdet', 'mmseg'):
        with DefaultScope.overwrite_default_scope(scope):
            assert isinstance(MODELS.build(dict(type='YOLOLite')), YOLOLite)
