"""Stock mmdet / mmseg configs that expand_mm does not ship, turned into ExpandNets by
the README's recipe: a few training iterations on tiny data, the compact checkpoint
the run writes, a strict load into the stock config, and the stock inference API's
outputs of the contracted model against the trained one's, after batch norm is
calibrated on data (with its initial statistics an untrained network's outputs
barely depend on the input, and a comparison would say little).
"""
from __future__ import annotations

import math
import os
import os.path as osp
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner
from PIL import Image

import expand_mm
from expand_mm.apis import compact_config
from expand_mm.models.deployable import find_deployable
from expand_mm.verification import flatten_tensors
from data_factory import make_cityscapes, make_coco
from mm_test_utils import shrink_for_test
from test_integration import assert_same_detections, keep_all_detections
from wrapper_test_utils import ROOT

COCO_NAMES = ('person', 'bicycle', 'car')


@dataclass
class StockCase:
    """A stock config, the tiny data it trains on and what its ExpandNet changes."""

    base: str
    data: str  # 'coco', 'cityscapes' or 'ade'
    size: tuple[int, int]
    model_options: dict = field(default_factory=dict)  # ExpandNet options (ratio, expand_linear)
    stock_model_options: dict = field(default_factory=dict)  # changes to the stock model
    stock_hooks: tuple[str, ...] = ()  # the stock config's custom hooks, which must run
    # Compare the heads' raw outputs instead of the detections, where the detections of a
    # 2-iteration model say little: an untrained SSD300 scores its 8,732 anchors nearly
    # alike, and NMS picks among near-ties by float32 rounding; an untrained YOLOX decodes
    # exp() of its raw offsets into boxes near 1e10 or past float32 (inf - inf = nan); an
    # untrained RTMDet's top detections can sit at the head's prior whatever the image.
    compare_raw_outputs: bool = False
    # Measure how much the outputs depend on the image on the raw outputs too (YOLOX,
    # RTMDet); SSD300's VGG has no batch norm to calibrate, its raw outputs are nearly
    # constant, and its guard stays on the detections.
    input_dependence_on_raw_outputs: bool = False


CASES = {
    'rtmdet_tiny': StockCase('mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 'coco', (64, 64),
                             stock_hooks=('EMAHook', 'PipelineSwitchHook'),
                             compare_raw_outputs=True, input_dependence_on_raw_outputs=True),
    'retinanet_r18': StockCase('mmdet::retinanet/retinanet_r18_fpn_1x_coco.py', 'coco',
                               (64, 64)),
    # SSD300's anchors need 300x300 inputs; ratio 2 keeps its training form near 150 M
    # parameters here (docs/benchmarks.md measures ratio 4 end to end).
    'ssd300': StockCase('mmdet::ssd/ssd300_coco.py', 'coco', (300, 300),
                        model_options=dict(ratio=2), compare_raw_outputs=True),
    # base_channels 16 instead of 64 keeps the test a CPU's size; same architecture, the
    # heads reading the decoder's 16 (in_index 4) and 32 (in_index 3) channels.
    'unet_s5_d16': StockCase('mmseg::unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py',
                             'cityscapes', (64, 128),
                             stock_model_options=dict(
                                 backbone=dict(base_channels=16),
                                 decode_head=dict(in_channels=16, channels=16),
                                 auxiliary_head=dict(in_channels=32, channels=16))),
    'segformer_b0': StockCase('mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
                              'ade', (64, 64), model_options=dict(expand_linear=True)),
    'yolox_s': StockCase('mmdet::yolox/yolox_s_8xb8-300e_coco.py', 'coco', (64, 64),
                         stock_hooks=('YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook'),
                         compare_raw_outputs=True, input_dependence_on_raw_outputs=True),
}


def readme_recipe() -> str:
    """The README's ExpandNet recipe (its Python block with ``type='ExpandNet'``)."""
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), flags=re.S)
    return next(b for b in blocks if "type='ExpandNet'" in b and '_base_' in b)


def make_ade(root: str, num_images: int = 2, size: int = 64) -> None:
    """Write an ADE20K tree: ``images/{split}/*.jpg`` and ``annotations/{split}/*.png``."""
    rng = np.random.default_rng(0)
    for split in ('training', 'validation'):
        for sub in ('images', 'annotations'):
            os.makedirs(osp.join(root, sub, split), exist_ok=True)
        for i in range(num_images):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            label = np.zeros((size, size), np.uint8)
            label[size // 4:size // 2, size // 4:] = 1 + i  # 0 is ignored (reduce_zero_label)
            label[size // 2:, :size // 2] = 5
            Image.fromarray(image).save(osp.join(root, 'images', split, f'ADE_{i:04d}.jpg'))
            Image.fromarray(label).save(osp.join(root, 'annotations', split,
                                                 f'ADE_{i:04d}.png'))


IMAGES = {'coco': ('val2017/00000.png', 'val2017/00001.png'),
          'cityscapes': tuple(f'leftImg8bit/val/city/city_{i:06d}_000019_leftImg8bit.png'
                              for i in range(2)),
          'ade': ('images/validation/ADE_0000.jpg', 'images/validation/ADE_0001.jpg')}


def tiny_dataset(kind: str, root: str) -> tuple[str, list[str]]:
    """``(data_root, two images of it)``, made once per kind under ``root``."""
    data_root = osp.join(root, kind) + '/'
    if not osp.isdir(data_root):
        if kind == 'coco':
            for split in ('train2017', 'val2017'):
                make_coco(data_root, num_images=2, size=64, split=split, class_names=COCO_NAMES)
        elif kind == 'cityscapes':
            make_cityscapes(data_root, num_images=2)
        else:
            make_ade(data_root)
    return data_root, [osp.join(data_root, image) for image in IMAGES[kind]]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp('stock_data'))


def expandnet_config(case: StockCase, tmp_path) -> Config:
    """The README's recipe on ``case.base``, with the case's options."""
    path = tmp_path / 'expandnet.py'
    path.write_text(re.sub(r"_base_ = '[^']*'", f'_base_ = {case.base!r}', readme_recipe()))
    cfg = Config.fromfile(str(path))
    cfg.model.update(case.model_options)
    _merge(cfg.model.model, case.stock_model_options)
    return cfg


def _merge(target: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def stock_config(cfg: Config) -> Config:
    """The stock config of the compact model of ``cfg``, every detection kept."""
    stock = compact_config(cfg)
    keep_all_detections(stock.model)
    return stock


def calibrate_batch_norm(model: torch.nn.Module, runner: Runner) -> None:
    """Set every batch norm's running statistics to those of a training batch.

    Batch norms a backbone keeps frozen (``norm_eval``) are calibrated too: the
    point is statistics that make the outputs depend on the input. A model
    without batch norm (SSD300's VGG) has nothing to calibrate; the caller's
    input-dependence check guards the comparison either way.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    data = model.data_preprocessor(next(iter(runner.train_dataloader)), True)
    model.train()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics
        norm.train()
    with torch.no_grad():
        model(data['inputs'], data['data_samples'], mode='tensor')
    model.eval()


def count_calls(hook, method: str) -> list:
    """Record each call of ``hook.method`` (the hook still runs)."""
    calls = []
    original = getattr(hook, method)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(hook, method, recorded)
    return calls


def stock_outputs(model, cfg: Config, image: str):
    """What the stock inference API returns for ``model`` (built from ``cfg``) on ``image``."""
    model.cfg = cfg
    if cfg.default_scope == 'mmdet':
        from mmdet.apis import inference_detector
        return inference_detector(model, image)
    from mmseg.apis import inference_model
    return inference_model(model, image)


def assert_same_outputs(deployed, trained, scope: str) -> None:
    """The compact model's outputs are the trained ExpandNet's, to float32 rounding."""
    if scope == 'mmdet':
        assert_same_detections(deployed.pred_instances, trained.pred_instances)
        return
    a, b = deployed.seg_logits.data, trained.seg_logits.data
    assert float(a.std()) > 0, 'constant logits: the comparison would say nothing'
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def raw_outputs(nets, runner: Runner) -> list[torch.Tensor]:
    """Each net's ``mode='tensor'`` outputs on one training batch, one row per image."""
    data = nets[0].data_preprocessor(next(iter(runner.train_dataloader)), False)
    with torch.no_grad():
        return [torch.cat([t.flatten(1) for t in flatten_tensors(net.eval()(data['inputs'],
                                                                        mode='tensor'))], dim=1)
                for net in nets]


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest change from ``a`` to ``b``, relative to ``a``'s largest entry."""
    return float((a - b).abs().max() / a.abs().max())


def assert_same_raw_outputs(deployed: torch.Tensor, trained: torch.Tensor) -> None:
    """Two networks' raw outputs (:func:`raw_outputs`) agree to float32 rounding."""
    a, b = deployed.flatten(), trained.flatten()
    assert float(a.std()) > 0, 'constant outputs: the comparison would say nothing'
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def input_dependence(model, cfg: Config, images: list[str], scope: str) -> float:
    """How much the outputs change between two images (relative): > 0 for a real check."""
    outs = [stock_outputs(model, cfg, image) for image in images]
    if scope == 'mmdet':  # the boxes too: an untrained head's scores sit near its prior
        top = min(len(o.pred_instances) for o in outs)
        a, b = (torch.cat([o.pred_instances.scores[:top], o.pred_instances.bboxes[:top].flatten()])
                for o in outs)
    else:
        a, b = (o.seg_logits.data for o in outs)
    return relative_change(a, b)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_a_stock_config_trains_contracts_and_deploys_as_an_expandnet(name, tmp_path, data_dir):
    case = CASES[name]
    data_root, images = tiny_dataset(case.data, data_dir)
    cfg = expandnet_config(case, tmp_path)
    work = str(tmp_path / 'work')
    shrink_for_test(cfg, work, data_root, case.size, max_iters=2)
    runner = Runner.from_cfg(cfg)
    hook_types = {type(h).__name__: h for h in runner.hooks}
    assert set(case.stock_hooks) <= set(hook_types), 'the recipe dropped a stock hook'
    calls = {hook: count_calls(hook_types[hook], 'before_train_epoch')
             for hook in case.stock_hooks if hook != 'EMAHook'}
    runner.train()
    model = runner.model
    assert expand_mm.expanded_layers(model), 'the model trained was not expanded'
    if name == 'segformer_b0':
        skipped = dict(model.expansion_report.skipped)
        attention = [p for p in skipped if p.endswith('in_proj_weight')]
        assert attention and all('MultiheadAttention' in skipped[p] for p in attention)
    for hook, seen in calls.items():
        assert seen, f'{hook} did not run'
    if 'EMAHook' in case.stock_hooks:
        ema = hook_types['EMAHook'].ema_model
        assert int(ema.steps) == 2 and 'ema_state_dict' in torch.load(osp.join(work, 'iter_2.pth'))

    # The run's own compact checkpoint loads strictly into the stock config.
    stock_cfg = stock_config(cfg)
    written = torch.load(osp.join(work, 'iter_2_compact.pth'))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        stock = MODELS.build(stock_cfg.model)
    stock.load_state_dict(written['state_dict'], strict=True)

    # After calibrating batch norm, the contraction predicts what the ExpandNet predicts,
    # through the stock inference API on the stock config.
    if 'EMAHook' in case.stock_hooks:
        model = hook_types['EMAHook'].ema_model.module  # the weights saved and deployed
    calibrate_batch_norm(model, runner)
    compact_file = osp.join(work, 'calibrated_compact.pth')
    torch.save({'state_dict': expand_mm.contract_model(model).state_dict(),
                'meta': written['meta']}, compact_file)  # mmseg's init_model reads the meta
    if cfg.default_scope == 'mmdet':
        from mmdet.apis import init_detector as init_stock
    else:
        from mmseg.apis import init_model as init_stock
    deployed = init_stock(stock_cfg, compact_file, device='cpu')
    assert not expand_mm.expanded_layers(deployed)
    for head in (model, getattr(model, 'bbox_head', None)):  # built with the thresholds
        keep_all_detections(getattr(head, 'test_cfg', None))
    if case.compare_raw_outputs or case.input_dependence_on_raw_outputs:
        deployed_raw, trained_raw = raw_outputs([deployed, model], runner)
    if case.input_dependence_on_raw_outputs:  # the batch's first two images
        assert relative_change(deployed_raw[0], deployed_raw[1]) > 1e-4
        assert len(stock_outputs(deployed, stock_cfg, images[0]).pred_instances), \
            'the stock inference API returned no detections'
    else:
        assert input_dependence(deployed, stock_cfg, images, cfg.default_scope) > 1e-4
    if case.compare_raw_outputs:
        assert_same_raw_outputs(deployed_raw, trained_raw)
    else:
        assert_same_outputs(stock_outputs(deployed, stock_cfg, images[0]),
                            stock_outputs(model, cfg, images[0]), cfg.default_scope)

    if name == 'rtmdet_tiny':  # the run's compact checkpoint starts an ExpandNet run
        again = expandnet_config(case, tmp_path)
        shrink_for_test(again, str(tmp_path / 'again'), data_root, case.size, max_iters=1)
        again.load_from = osp.join(work, 'iter_2_compact.pth')
        loaded = Runner.from_cfg(again)
        loaded.call_hook('before_run')
        loaded.load_or_resume()
        contracted = expand_mm.contract_model(loaded.model).state_dict()
        for key, value in written['state_dict'].items():
            torch.testing.assert_close(contracted[key], value, rtol=1e-5,
                                       atol=1e-6 * float(value.abs().max()) + 1e-7)


class _Attention(torch.nn.Module):
    def __init__(self, kdim: int | None = None):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim)
        self.head = torch.nn.Linear(8, 3)


@pytest.mark.parametrize('kdim, raw', [(None, ['in_proj_weight']),
                                       (4, ['q_proj_weight', 'k_proj_weight', 'v_proj_weight'])])
def test_the_report_lists_the_attention_input_projections_it_leaves_compact(kdim, raw):
    model = _Attention(kdim)
    report = expand_mm.expand_model(model, ratio=2, expand_linear=True)
    assert {layer.path for layer in report.layers} == {'attn.out_proj', 'head'}
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted(f'attn.{name}' for name in raw)
    assert all('MultiheadAttention' in reason for reason in skipped.values())
    assert 'nn.MultiheadAttention' in str(report)


def optimizer_settings(model: torch.nn.Module, optim_wrapper: dict) -> dict:
    """Parameter name -> ``(lr, weight_decay)`` of the optimizer the config builds."""
    optimizer = build_optim_wrapper(model, optim_wrapper).optimizer
    of_param = {id(p): (group['lr'], group.get('weight_decay', 0.0))
                for group in optimizer.param_groups for p in group['params']}
    return {name: of_param[id(p)] for name, p in model.named_parameters() if id(p) in of_param}


# The stock optimizers issue 25 names: AdamW at 0.004 (above the factor-rate ceiling of
# 1.5e-3: multiplier 0.375), AdamW at 6e-5 (below it: 1), and SGD (rates left alone).
STOCK_OPTIMIZERS = [('rtmdet_tiny', 0.375), ('segformer_b0', 1.0), ('yolox_s', None)]


@pytest.mark.parametrize('name, default_mult', STOCK_OPTIMIZERS)
def test_a_stock_optimizer_keeps_its_settings_and_the_factors_get_the_documented_rates(
        name, default_mult, tmp_path):
    """Every parameter the ExpandNet shares with the stock model trains as the stock
    constructor sets it (custom_keys, norm and bias decay); each factor of an expanded
    layer has the compact weight's decay and, under an adaptive optimizer, the rate
    ``min(lr, 1.5e-3) * sqrt(f_compact / f_i) / L`` (SGD: the compact weight's rate)."""
    cfg = expandnet_config(CASES[name], tmp_path)
    stock_cfg = compact_config(cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        expandnet, stock = MODELS.build(cfg.model), MODELS.build(stock_cfg.model)
        ours = optimizer_settings(expandnet, cfg.optim_wrapper)
        theirs = optimizer_settings(stock, stock_cfg.optim_wrapper)
    deployable, prefix = find_deployable(expandnet)
    layers = expand_mm.expanded_layers(deployable)
    assert len(layers) > 10
    in_layers = tuple(f'{prefix}{path}.' for path, _ in layers)
    shared = [n for n in ours if not n.startswith(in_layers)]
    assert len(shared) > 10
    for name_ in shared:
        assert ours[name_] == theirs[name_[len(prefix):]], name_
    compact_weights = dict(stock.named_parameters())
    names = {id(p): n for n, p in expandnet.named_parameters()}
    for path, layer in layers:
        compact_lr, compact_decay = theirs[f'{path}.weight']
        compact_fan_in = compact_weights[f'{path}.weight'][0].numel()
        for index, sub in enumerate(layer.sublayers):
            lr, decay = ours[names[id(sub.weight)]]
            assert decay == compact_decay
            expected = compact_lr if default_mult is None else (
                compact_lr * default_mult * math.sqrt(compact_fan_in / sub.weight[0].numel())
                / len(layer.sublayers))
            assert lr == pytest.approx(expected, rel=1e-9), (path, index)
