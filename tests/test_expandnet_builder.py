"""type='ExpandNet': build-time expansion, init on the compact form, pretrained weights."""
import os.path as osp

import pytest
import torch
from mmengine.registry import MODELS, DefaultScope

import expand_mm
from mm_test_utils import load_config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMPACT = osp.join(ROOT, 'configs', 'yolo_lite', 'yolo-lite_8xb16-100e_voc0712.py')


def build(model_cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model_cfg)


def expandnet_cfg(**kwargs):
    compact = load_config(COMPACT).model
    return dict(type='ExpandNet', model=compact, **kwargs)


def test_pretrained_backbone_is_kept_exactly_and_the_rest_is_fresh(tmp_path):
    torch.manual_seed(0)
    pretrained = build(load_config(COMPACT).model)
    ckpt = tmp_path / 'backbone.pth'
    torch.save({'state_dict': pretrained.backbone.state_dict()}, ckpt)

    cfg = expandnet_cfg(strategy='cl', ratio=2)
    cfg['model']['backbone']['init_cfg'] = dict(type='Pretrained', checkpoint=str(ckpt))
    model = build(cfg)  # building must not initialise (nothing may be fetched for tests)
    assert expand_mm.expanded_layers(model)
    model.init_weights()
    compact = expand_mm.contract_model(model)
    for key, value in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(compact.backbone.state_dict()[key], value,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('init, stock_like', [('compact', True), ('fresh', False)])
def test_init_compact_factorises_every_layer_from_the_stock_init(init, stock_like):
    torch.manual_seed(0)
    model = build(expandnet_cfg(strategy='cl', ratio=2, init=init))
    model.init_weights()
    # YOLOV3Head.init_weights draws every head conv from N(0, 0.01): with
    # init='compact' the expanded head convs compose to exactly such kernels;
    # with init='fresh' they compose whatever their standalone factors give.
    weight = dict(expand_mm.expanded_layers(model))['bbox_head.convs_bridge.0.conv'].weight
    assert (abs(float(weight.std()) - 0.01) < 0.001) == stock_like, float(weight.std())


def test_init_orthogonal_equalises_each_factors_singular_values_and_keeps_its_norm():
    torch.manual_seed(0)
    model = build(expandnet_cfg(strategy='cl', ratio=2, init='orthogonal'))
    fresh_norms = {name: float(p.norm()) for name, p in model.named_parameters()
                   if '.convs.' in name and name.endswith('weight')}
    model.init_weights()
    layers = expand_mm.expanded_layers(model)
    assert layers
    for path, layer in layers:
        for index, conv in enumerate(layer.convs):
            name = f'{path}.convs.{index}.weight'
            matrices = conv.weight.detach().double().reshape(conv.groups, conv.out_channels
                                                             // conv.groups, -1)
            singular = torch.linalg.svdvals(matrices)
            assert float(singular.max() / singular.min()) < 1 + 1e-4, name
            assert abs(float(conv.weight.norm()) / fresh_norms[name] - 1) < 1e-4, name


def test_bad_builder_arguments_name_the_key():
    with pytest.raises(ValueError, match="init='zero' must be one of \\('fresh', 'orthogonal'"):
        build(expandnet_cfg(init='zero'))
    with pytest.raises(ValueError, match="keep_weights=3 must be True/False or a list"):
        build(expandnet_cfg(keep_weights=3))
    # A misspelled option names the option meant, not the detector's __init__.
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ratoi'\]. 'ratoi': did you "
                                         r"mean 'ratio'\? ExpandNet takes"):
        build(expandnet_cfg(ratoi=2))
    # A compact-model key at the top level says where it belongs.
    with pytest.raises(ValueError, match=r"'bbox_head' is a key of the inner model: set it "
                                         r"inside `model` \(--cfg-options model.model.bbox_head"):
        build(expandnet_cfg(bbox_head=dict(num_classes=3)))
    # Several of them: the inherited compact model merged in (no _delete_=True).
    compact = load_config(COMPACT).model
    with pytest.raises(ValueError, match=r"start the dict with `_delete_=True`"):
        build(expandnet_cfg(backbone=compact.backbone, neck=compact.neck))
    with pytest.raises(ValueError, match="include pattern 'backbon.*'"):
        build(expandnet_cfg(include=['backbon.*']))


def _one_train_step(model):
    """One MMEngine train_step of ``model`` on a random detection batch; factor grads."""
    from mmdet.testing import demo_mm_inputs
    from mmengine.optim import OptimWrapper
    torch.manual_seed(0)
    data = demo_mm_inputs(2, image_shapes=(3, 64, 64), num_classes=20)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: grads only
    grads = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda t, name=name: grads.__setitem__(name, t.grad.clone()))
    model.train_step(data, optim)
    return grads


def test_train_step_defers_factor_grads_and_gets_the_same_gradients():
    torch.manual_seed(0)
    deferred = build(expandnet_cfg(strategy='cl', ratio=2))
    torch.manual_seed(0)
    plain = build(expandnet_cfg(strategy='cl', ratio=2, defer_factor_grads=False))
    deferred.init_weights()
    plain.load_state_dict(deferred.state_dict())
    assert deferred.expandnet_cfg['defer_factor_grads'] is True
    layers = dict(expand_mm.expanded_layers(deferred))
    seen = []
    for layer in layers.values():
        layer.register_forward_pre_hook(lambda m, args: seen.append(m.defer_factor_grads))
    got, want = _one_train_step(deferred), _one_train_step(plain)
    assert seen and all(seen)  # on inside train_step ...
    assert not any(layer.defer_factor_grads for layer in layers.values())  # ... off after
    assert got.keys() == want.keys() and len(got) == len(list(plain.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5,
                                   atol=1e-5 * float(want[name].abs().max()), msg=name)


def test_defer_factor_grads_must_be_a_bool():
    with pytest.raises(ValueError, match="defer_factor_grads='yes'"):
        build(expandnet_cfg(defer_factor_grads='yes'))


def test_without_the_deferral_hooks_the_expandnet_builds_with_plain_autograd(monkeypatch):
    """A torch lacking torch._C._current_graph_task_id (private API) gets plain
    autograd, and the log says why, instead of a train step that raises."""
    from mmengine.logging import MMLogger
    monkeypatch.delattr(torch._C, '_current_graph_task_id')
    warnings = []
    monkeypatch.setattr(MMLogger.get_current_instance(), 'warning', warnings.append)
    model = build(expandnet_cfg(strategy='cl', ratio=2))
    assert model.expandnet_cfg['defer_factor_grads'] is False
    assert any('_current_graph_task_id' in w and 'plain autograd' in w for w in warnings)
    model.init_weights()
    grads = _one_train_step(model)
    assert len(grads) == len(list(model.parameters()))


def test_single_patterns_given_as_strings_are_one_pattern():
    """`--cfg-options model.include=backbone.*` passes a string, not a list."""
    as_string = build(expandnet_cfg(strategy='cl', ratio=2, include='backbone.*',
                                    exclude='backbone.stages.0.*',
                                    keep_weights='backbone.stages.1.*'))
    as_list = build(expandnet_cfg(strategy='cl', ratio=2, include=['backbone.*'],
                                  exclude=['backbone.stages.0.*'],
                                  keep_weights=['backbone.stages.1.*']))
    paths = [r.path for r in as_string.expansion_report.layers]
    assert paths == [r.path for r in as_list.expansion_report.layers]
    assert paths and all(p.startswith('backbone.') and not p.startswith('backbone.stages.0.')
                         for p in paths)
    assert as_string.expandnet_cfg['keep_weights'] == ['backbone.stages.1.*']


def test_kept_ck_layers_with_a_too_small_ratio_are_refused_at_build_time():
    """The exact CK factorisation at init_weights() needs a minimum ratio: say so at build."""
    k5 = load_config(osp.join(ROOT, 'configs', 'yolo_lite',
                                  'yolo-lite-k5_8xb16-100e_voc0712.py')).model
    with pytest.raises(ValueError, match=r"init='compact' / keep_weights=True asks for an exact "
                                         r"CK factorisation .* at ratio=2, too small for: "
                                         r"backbone\.\S+ \(5x5, needs ratio >= \d+\).*"
                                         r"strategy='cl'"):
        build(dict(type='ExpandNet', model=k5, strategy='auto', ratio=2, init='compact'))
    fresh = build(dict(type='ExpandNet', model=k5, strategy='auto', ratio=2))
    strategies = {r.strategy for r in fresh.expansion_report.layers}
    assert 'ck' in strategies  # the same expansion builds when nothing is kept
    needs = {layer.exact_min_ratio() for _, layer in expand_mm.expanded_layers(fresh)
             if layer.strategy == 'ck'}
    enough = build(dict(type='ExpandNet', model=k5, strategy='auto', ratio=max(needs),
                        init='compact'))
    enough.init_weights()  # factorises every kept CK layer without raising


def test_misspelled_model_key_and_unmatched_keep_weights_are_named():
    compact = load_config(COMPACT).model
    with pytest.raises(ValueError, match=r"`model`, the compact model's config, is missing "
                                         r"\('modle': did you mean 'model'\?\)"):
        build(dict(type='ExpandNet', modle=compact))
    with pytest.raises(ValueError, match="`model`, the compact model's config, is missing: "):
        build(dict(type='ExpandNet', ratio=2))
    with pytest.raises(ValueError, match=r"keep_weights pattern 'nek\.\*' matches no expanded "
                                         r"layer .* Nearest: .*neck"):
        build(expandnet_cfg(strategy='cl', ratio=2, keep_weights=['nek.*']))
    # A module left compact (a 1x1 conv) is no expanded layer either.
    with pytest.raises(ValueError, match="keep_weights pattern 'bbox_head.convs_pred.0'"):
        build(expandnet_cfg(strategy='cl', ratio=2, keep_weights=['bbox_head.convs_pred.0']))


def test_wrapper_level_settings_reach_the_compact_model_and_its_config():
    """--cfg-options model.test_cfg... / model.data_preprocessor.size=... on an ExpandNet
    config act as they do on the compact config: built and in compact_model_cfg."""
    from expand_mm.models import compact_model_cfg
    unet = load_config(str(osp.join(ROOT, 'configs', 'expandnet', 'expandnet-cl-r4_unet-'
                                        's5-d16-c16-fcn_4xb4-160k_cityscapes-512x1024.py')))
    slide = dict(mode='slide', crop_size=(16, 16), stride=(16, 16))
    unet.merge_from_dict({'model.test_cfg': slide,
                          'model.data_preprocessor.size': (32, 64),
                          'model.data_preprocessor.pad_val': 7})
    inner = compact_model_cfg(unet.model)
    assert inner['test_cfg'] == slide
    assert inner['data_preprocessor']['size'] == (32, 64)
    assert inner['data_preprocessor']['type'] == 'SegDataPreProcessor'
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(unet.model)
    assert model.test_cfg['mode'] == 'slide'
    assert tuple(model.data_preprocessor.size) == (32, 64)
    assert model.data_preprocessor.pad_val == 7
    # A full top-level preprocessor (what the Runner passes) does not replace the model's own.
    plain = load_config(str(osp.join(ROOT, 'configs', 'expandnet', 'expandnet-cl-r4_unet-'
                                         's5-d16-c16-fcn_4xb4-160k_cityscapes-512x1024.py')))
    own = dict(plain.model.model.data_preprocessor)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(dict(plain.model, data_preprocessor=dict(own, size=(8, 8))))
    assert tuple(model.data_preprocessor.size) == tuple(own['size'])
    assert compact_model_cfg(plain.model) is plain.model.model  # nothing to carry: the same


def test_fresh_expanded_head_convs_keep_the_heads_prior_bias():
    """expand_1x1 on YOLOv3's prediction convs: fresh factor weights, but the composed bias
    is the stock init's (the objectness / class prior), not the fresh chain's."""
    torch.manual_seed(0)
    model = build(expandnet_cfg(strategy='cl', ratio=2, expand_1x1=True,
                                include=['bbox_head.convs_pred.*']))
    model.init_weights()
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        stock = MODELS.build(load_config(COMPACT).model)
    stock.init_weights()
    layers = dict(expand_mm.expanded_layers(model))
    assert len(layers) == 3
    for path, layer in layers.items():
        weight, bias = layer.composed()
        reference = stock.get_submodule(path)
        torch.testing.assert_close(bias, reference.bias, rtol=1e-6, atol=1e-6)
        assert float(reference.bias.min()) < -3  # the prior: log(0.01 / 0.99)-like values
        assert not torch.allclose(weight, reference.weight)  # the weights stay fresh
