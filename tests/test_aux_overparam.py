"""Auxiliary over-parameterisation (``type='AuxOverParam'``) through the real Runner.

A wider, training-only copy of the head feeds on the compact net's features:
its losses are logged on their own, reach the shared backbone, and the
compact checkpoint holds only the compact net (contracted when it is an
ExpandNet), which loads strictly into the stock compact config and computes
what the trained main branch computes.
"""
from __future__ import annotations

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import expand_mm
from expand_mm.models import widen_head_cfg
from wrapper_test_utils import (DET_COMPACT, ROOT, SEG_COMPACT, assert_same_raw_outputs,
                                compact_checkpoint, load_stock, logged, tiny_cfg)

AUX_DET = ROOT / ('projects/digits/configs/aux/'
                  'aux-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')


def split_losses(model, losses: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(main, auxiliary) total losses of one ``loss()`` output."""
    main, _ = model.parse_losses({k: v for k, v in losses.items()
                                  if not k.startswith(model.loss_prefix)})
    aux, _ = model.parse_losses({k: v for k, v in losses.items()
                                 if k.startswith(model.loss_prefix)})
    return main, aux


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(sum(g.abs().sum() for g in grads if g is not None))


@pytest.mark.slow
def test_det_aux_branch_on_an_expandnet(digits_data, tmp_path):
    work = tmp_path / 'work'
    runner = Runner.from_cfg(tiny_cfg(AUX_DET, digits_data, work, 'det'))
    runner.train()
    model = runner.model
    assert type(model).__name__ == 'AuxOverParam'
    assert expand_mm.expanded_layers(model.model)
    assert not expand_mm.expanded_layers(model.aux_head)
    assert list(model.aux_head.out_channels) == [2 * c for c in
                                                 model.model.bbox_head.out_channels]
    assert list(model.aux_head.in_channels) == list(model.model.bbox_head.in_channels)
    assert logged(runner, 'aux_op.loss_conf') > 0 and logged(runner, 'loss_conf') > 0

    # The compact checkpoint: the contracted main branch only.
    compact = compact_checkpoint(work)
    assert not any(k.startswith(('aux_head.', 'model.')) for k in compact)
    assert_same_raw_outputs(load_stock(DET_COMPACT, compact), model, model.model)

    # Gradients (checked last: a training-mode forward moves the BN statistics):
    # the branch gets the auxiliary loss's, the shared backbone both heads'.
    model.train()
    batch = model.data_preprocessor(next(iter(runner.train_dataloader)), True)
    main, aux = split_losses(model, model.loss(**batch))
    backbone = [p for p in model.model.backbone.parameters() if p.requires_grad]
    branch = list(model.aux_head.parameters())
    assert grad_norm(aux, branch) > 0
    assert grad_norm(aux, backbone) > 0 and grad_norm(main, backbone) > 0
    assert grad_norm(main, branch) == 0


@pytest.mark.slow
def test_seg_aux_branch_on_a_plain_compact_model(digits_data, tmp_path):
    work = tmp_path / 'work'
    cfg = tiny_cfg(SEG_COMPACT, digits_data, work, 'seg')
    cfg.model = dict(type='AuxOverParam', model=cfg.model, width_mult=2.0, aux_weight=0.5)
    cfg.custom_hooks = [dict(type='ExpandCheckpointLoadHook'),
                        dict(type='ContractCheckpointHook')]
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    assert model.head == 'decode_head'
    assert model.aux_head.channels == 2 * model.model.decode_head.channels
    assert logged(runner, 'aux_op.loss_ce') > 0 and logged(runner, 'decode.loss_ce') > 0

    # No expanded layer: the compact checkpoint is the main branch's weights as they are.
    compact = compact_checkpoint(work)
    own = model.model.state_dict()
    assert set(compact) == set(own)
    assert all(torch.equal(compact[k], own[k].cpu()) for k in own)
    assert_same_raw_outputs(load_stock(SEG_COMPACT, compact), model, rtol=1e-6)


def test_widen_head_cfg():
    head = dict(type='FCNHead', in_channels=32, channels=32, num_classes=11)
    assert widen_head_cfg(head, 2.0) == dict(type='FCNHead', in_channels=32, channels=64,
                                             num_classes=11)
    yolo = dict(type='YOLOV3Head', in_channels=[64, 32], out_channels=[128, 64])
    assert widen_head_cfg(yolo, 1.5)['out_channels'] == [192, 96]
    with pytest.raises(ValueError, match='none of the width keys'):
        widen_head_cfg(dict(type='Odd', in_channels=3), 2.0)


def test_config_names_the_deployable_compact_model():
    cfg = Config.fromfile(str(AUX_DET))
    compact = Config.fromfile(str(DET_COMPACT))
    assert cfg.model.type == 'AuxOverParam'
    assert expand_mm.models.deployable_model_cfg(cfg.model) == compact.model
    kd = Config.fromfile(str(ROOT / 'projects/digits/configs/distill/kd-yolo-lite-w2_expandnet-'
                             'cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'))
    assert expand_mm.models.deployable_model_cfg(kd.model) == compact.model
    nested = dict(type='Distiller', student=dict(cfg.model), teacher={}, teacher_ckpt='x')
    assert expand_mm.models.deployable_model_cfg(nested) == compact.model
    assert expand_mm.models.deployable_model_cfg(compact.model) is compact.model


@pytest.mark.parametrize('key, value, message', [
    ('width_mul', 4.0, r"AuxOverParam: unknown option\(s\) \['width_mul'\]. 'width_mul': did "
                       r"you mean 'width_mult'"),
    ('width_mult', '2', r"width_mult='2' must be a number > 0"),
    ('aux_weight', -1, r'aux_weight=-1 must be a number >= 0'),
])
def test_bad_options_name_the_key(key, value, message):
    from mmengine.registry import DefaultScope
    from wrapper_test_utils import build_model
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError, match=message):
            build_model(AUX_DET, **{key: value})
