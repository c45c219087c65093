"""ExpandNetOptimWrapperConstructor: per-factor learning rates for adaptive optimizers."""
import math
from unittest import mock

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.optim.scheduler import LinearLR
from torch import nn

import expand_mm
from expand_mm import ExpandConv2d, ExpandLinear, factor_lr_multipliers
from expand_mm.optim.factor_lr import default_factor_lr_mult

# The default multiplier of the fan-in rule at the tests' base rate, lr 0.01.
MULT = default_factor_lr_mult(0.01)


class TinyNet(nn.Module):
    """conv (expanded) -> BN -> head conv (compact) -> linear (expanded)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3)))


def expanded_tiny_net():
    torch.manual_seed(0)
    net = TinyNet()
    expand_mm.expand_model(net, strategy='cl', ratio=4, include=['conv', 'fc'],
                           expand_linear=True)
    return net


def group_lrs(wrapper, net):
    by_param = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            by_param[id(p)] = group['lr']
    return {name: by_param[id(p)] for name, p in net.named_parameters()}


def test_fan_in_multipliers_of_a_cl_conv():
    layer = ExpandConv2d(16, 32, 3, strategy='cl', ratio=4)
    # fan-ins: 16 (1x1), 64 * 9 (3x3), 128 (1x1); compact 16 * 9; three factors.
    expected = [math.sqrt(144 / 16) / 3, math.sqrt(144 / 576) / 3, math.sqrt(144 / 128) / 3]
    assert factor_lr_multipliers(layer) == pytest.approx(expected)
    rss = factor_lr_multipliers(layer, chain='rss')
    assert rss == pytest.approx([m * 3 / math.sqrt(3) for m in expected])
    assert factor_lr_multipliers(layer, 'none') == [1.0, 1.0, 1.0]
    assert factor_lr_multipliers(layer, 0.5) == [0.5, 0.5, 0.5]


def test_fan_in_multipliers_of_grouped_ck_and_linear():
    layer = ExpandConv2d(8, 8, 5, groups=8, strategy='ck', ratio=2)
    # depthwise 5x5 -> two depthwise 3x3: per-group fan-ins 9 and 2 * 9; compact 25.
    assert factor_lr_multipliers(layer) == pytest.approx(
        [math.sqrt(25 / 9) / 2, math.sqrt(25 / 18) / 2])
    linear = ExpandLinear(10, 6, ratio=4)
    assert factor_lr_multipliers(linear) == pytest.approx(
        [math.sqrt(10 / 10) / 3, math.sqrt(10 / 40) / 3, math.sqrt(10 / 24) / 3])


def test_adamw_groups_get_scaled_rates_and_the_rest_the_base_rate():
    net = expanded_tiny_net()
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.01)))
    lrs = group_lrs(wrapper, net)
    conv_mults = factor_lr_multipliers(dict(expand_mm.expanded_layers(net))['conv'])
    for i, mult in enumerate(conv_mults):
        assert lrs[f'conv.convs.{i}.weight'] == pytest.approx(0.01 * mult * MULT)
    fc_mults = factor_lr_multipliers(dict(expand_mm.expanded_layers(net))['fc'])
    for i, mult in enumerate(fc_mults):
        assert lrs[f'fc.linears.{i}.weight'] == pytest.approx(0.01 * mult * MULT)
        assert lrs[f'fc.linears.{i}.bias'] == pytest.approx(0.01 * mult * MULT)
    for name in ('bn.weight', 'bn.bias', 'head.weight', 'head.bias'):
        assert lrs[name] == 0.01
    # Every parameter is in exactly one group.
    assert sum(len(g['params']) for g in wrapper.optimizer.param_groups) == len(
        list(net.parameters()))


def test_a_frozen_sub_module_is_left_out_without_a_warning_per_parameter():
    net = expanded_tiny_net()
    net.teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).requires_grad_(False)
    with mock.patch('mmengine.optim.optimizer.default_constructor.print_log') as log:
        wrapper = build_optim_wrapper(net, dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.01)))
    grouped = {id(p) for g in wrapper.optimizer.param_groups for p in g['params']}
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}
    assert not [c for c in log.call_args_list if 'requires_grad' in str(c.args[0])]


def test_custom_keys_compose_with_factor_rates_and_schedulers_scale_them():
    net = expanded_tiny_net()
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='Adam', lr=0.01),
        paramwise_cfg=dict(custom_keys={'conv.convs.1': dict(lr_mult=0.1)})))
    mult = factor_lr_multipliers(dict(expand_mm.expanded_layers(net))['conv'])[1] * MULT
    assert group_lrs(wrapper, net)['conv.convs.1.weight'] == pytest.approx(0.01 * 0.1 * mult)
    scheduler = LinearLR(wrapper, start_factor=0.5, by_epoch=False, begin=0, end=2)
    assert group_lrs(wrapper, net)['conv.convs.1.weight'] == pytest.approx(
        0.5 * 0.01 * 0.1 * mult)
    scheduler.step()
    scheduler.step()
    assert group_lrs(wrapper, net)['conv.convs.1.weight'] == pytest.approx(0.01 * 0.1 * mult)


def test_auto_leaves_sgd_alone_and_explicit_rule_overrides():
    net = expanded_tiny_net()
    sgd = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
    assert set(group_lrs(sgd, net).values()) == {0.1}
    # nothing to scale: exactly the default constructor, one group for all
    assert len(sgd.optimizer.param_groups) == 1
    forced = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
        paramwise_cfg=dict(factor_lr=0.5)))
    lrs = group_lrs(forced, net)
    assert lrs['conv.convs.0.weight'] == pytest.approx(0.05)
    assert lrs['head.weight'] == pytest.approx(0.1)


@pytest.mark.parametrize('channels', [16, 64])
def test_one_adam_step_moves_the_composed_kernel_like_the_compact_one(channels):
    """Why the rule exists: the relative step of the composed kernel, measured."""
    torch.manual_seed(0)
    compact = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(compact.weight, mode='fan_out')  # mmcv ConvModule's init
    x = torch.randn(4, channels, 12, 12)
    target = torch.randn(4, channels, 12, 12)

    def relative_step(module, **paramwise_cfg):
        before = module.weight.detach().clone()
        wrapper = build_optim_wrapper(module, dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='Adam', lr=1e-3), paramwise_cfg=paramwise_cfg))
        loss = ((module(x) - target) ** 2).mean()
        wrapper.update_params(loss)
        return float((module.weight.detach() - before).norm() / before.norm())

    compact_step = relative_step(compact)
    steps = {}
    for name, cfg in dict(plain=dict(factor_lr='none'), rule_only=dict(factor_lr_mult=1.0),
                          quarter=dict(factor_lr_mult=0.25)).items():
        torch.manual_seed(1)
        steps[name] = relative_step(ExpandConv2d.from_conv(compact, 'cl', 4), **cfg) / compact_step
    # Unscaled, the product moves many times faster than the compact kernel;
    # the fan-in rule removes most of it, a quarter of its rate the rest of the
    # first step (whole trainings want other rates: the default's ceiling).
    assert steps['plain'] > 10, steps
    assert 2.5 < steps['rule_only'] < 8, steps
    assert 0.6 < steps['quarter'] < 1.7, steps


@pytest.mark.parametrize('lr, mult', [(0.016, 0.09375), (0.004, 0.375), (0.001, 1.0)])
def test_the_default_factor_base_rate_is_the_compact_rate_up_to_a_ceiling(lr, mult):
    net = expanded_tiny_net()
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor', optimizer=dict(type='AdamW', lr=lr)))
    shares = factor_lr_multipliers(dict(expand_mm.expanded_layers(net))['conv'])
    lrs = group_lrs(wrapper, net)
    assert [lrs[f'conv.convs.{i}.weight'] for i in range(3)] == pytest.approx(
        [lr * mult * share for share in shares])


def test_default_extra_factor_belongs_to_the_fan_in_rule():
    net = expanded_tiny_net()
    lrs = group_lrs(build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor', optimizer=dict(type='AdamW', lr=0.01),
        paramwise_cfg=dict(factor_lr=0.5))), net)
    assert lrs['conv.convs.1.weight'] == pytest.approx(0.005)
    lrs = group_lrs(build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor', optimizer=dict(type='AdamW', lr=0.01),
        paramwise_cfg=dict(factor_lr='none'))), net)
    assert set(lrs.values()) == {0.01}


def test_bad_settings_name_the_key():
    net = expanded_tiny_net()
    # mmengine ignores unknown paramwise_cfg keys: a typo would train at the defaults.
    with pytest.raises(ValueError, match=r"paramwise_cfg.factor_lr_mul is not an option; did "
                                         r"you mean 'factor_lr_mult'\?"):
        build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                      optimizer=dict(type='AdamW', lr=0.01),
                                      paramwise_cfg=dict(factor_lr_mul=0.5)))
    from expand_mm.checks import check_constructor_for_paramwise_keys
    with pytest.raises(ValueError, match=r"sets \['factor_lr_mult'\], which only constructor="
                                         r"'ExpandNetOptimWrapperConstructor' reads"):
        check_constructor_for_paramwise_keys(dict(optimizer=dict(type='AdamW', lr=0.01),
                                                  paramwise_cfg=dict(factor_lr_mult=0.5)))
    check_constructor_for_paramwise_keys(dict(constructor='ExpandNetOptimWrapperConstructor',
                                              paramwise_cfg=dict(factor_lr_mult=0.5)))
    with pytest.raises(ValueError, match="factor_lr='fanin'"):
        build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                      optimizer=dict(type='AdamW', lr=0.01),
                                      paramwise_cfg=dict(factor_lr='fanin')))
    with pytest.raises(ValueError, match="factor_lr_chain='mean'"):
        build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                      optimizer=dict(type='AdamW', lr=0.01),
                                      paramwise_cfg=dict(factor_lr_chain='mean')))


def test_a_resume_with_other_factor_rates_says_the_saved_ones_apply():
    net = expanded_tiny_net()

    def build(mult):
        return build_optim_wrapper(net, dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=0.004),
            paramwise_cfg=dict(factor_lr_mult=mult)))

    saved = build(0.25).state_dict()
    logger = expand_mm.optim.factor_lr.MMLogger.get_current_instance()
    with mock.patch.object(logger, 'warning') as warning:
        same = build(0.25)
        same.load_state_dict(saved)
        warning.assert_not_called()
        changed = build(0.1)
        changed.load_state_dict(saved)
    (message,), _ = warning.call_args
    assert 'other learning rates in 9 of 13 param groups (saved / configured: 2.5..2.5)' in message
    assert 'a resume keeps the saved ones' in message and 'load_from=<checkpoint>' in message
    # What loads is the saved state, as MMEngine resumes every setting.
    assert [g['lr'] for g in changed.optimizer.param_groups] == \
        [g['lr'] for g in same.optimizer.param_groups]


def _composed_after_a_zero_gradient_step(net, optim_wrapper_cfg):
    """(composed kernel before, after) one optimizer step with zero gradients: only
    weight decay moves it."""
    wrapper = build_optim_wrapper(net, optim_wrapper_cfg)
    before = net.dw.composed()[0].detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    wrapper.optimizer.step()
    return wrapper, before, net.dw.composed()[0].detach().clone()


@pytest.mark.parametrize('weight_decay_on', ['factors', 'product'])
@pytest.mark.parametrize('optimizer', ['SGD', 'AdamW'])
def test_dwconv_decay_mult_reaches_every_factor_of_an_expanded_depthwise_conv(
        optimizer, weight_decay_on):
    """mmengine marks a conv depthwise when in_channels == groups; inside a CL chain
    only the first factor is, so the others used to decay at the full rate."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    expand_mm.expand_model(net, strategy='cl', ratio=4)
    wrapper, before, after = _composed_after_a_zero_gradient_step(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type=optimizer, lr=0.1, weight_decay=0.1),
        paramwise_cfg=dict(dwconv_decay_mult=0.0, weight_decay_on=weight_decay_on)))
    assert [g['weight_decay'] for g in wrapper.optimizer.param_groups] == [0.0] * 3
    torch.testing.assert_close(after, before)  # no decay, as on the compact conv
    # A plain (not depthwise) expanded conv keeps its decay.
    net.dw = expand_mm.ExpandConv2d(8, 8, 3, padding=1, strategy='cl', ratio=4, bias=False)
    wrapper, before, after = _composed_after_a_zero_gradient_step(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type=optimizer, lr=0.1, weight_decay=0.1),
        # At the factors' full rate: the default's ceiling would leave too little decay to see.
        paramwise_cfg=dict(dwconv_decay_mult=0.0, weight_decay_on=weight_decay_on,
                           factor_lr_mult=1.0)))
    assert float(after.norm() / before.norm()) < 0.999


def test_a_shared_expanded_conv_builds_with_adam_and_no_paramwise_cfg():
    """The stock constructor lists a shared module's parameters once (model.parameters());
    the per-factor groups must too."""
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    net = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(8)),
                        nn.Sequential(conv, nn.BatchNorm2d(8)))  # two parents, one conv
    expand_mm.expand_model(net, strategy='cl', ratio=2)
    wrapper = build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                            optimizer=dict(type='AdamW', lr=0.01)))
    listed = [id(p) for g in wrapper.optimizer.param_groups for p in g['params']]
    assert sorted(listed) == sorted(id(p) for p in net.parameters())


def test_dcn_offset_convs_stay_compact_and_keep_their_zero_init_and_rate():
    from mmcv.ops import ModulatedDeformConv2dPack
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ModulatedDeformConv2dPack(8, 8, 3,
                                                                               padding=1))
    report = expand_mm.expand_model(net, strategy='cl', ratio=2)
    assert [r.path for r in report.layers] == ['0']
    assert 'offset conv of a deformable conv' in dict(report.skipped)['1.conv_offset']
    assert type(net[1].conv_offset) is nn.Conv2d
    assert float(net[1].conv_offset.weight.abs().max()) == 0.0
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.01), paramwise_cfg=dict(dcn_offset_lr_mult=0.1)))
    assert group_lrs(wrapper, net)['1.conv_offset.weight'] == pytest.approx(0.001)


def test_factors_of_a_grouped_conv_are_not_taken_for_depthwise_ones():
    """Conv2d(8, 4, 3, groups=4) is not depthwise, but at ratio 1 its last CL factor
    (4 -> 4, groups=4) would pass mmengine's in_channels == groups test."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 4, 3, groups=4))
    expand_mm.expand_model(net, strategy='cl', ratio=1)
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.01, weight_decay=0.1),
        paramwise_cfg=dict(dwconv_decay_mult=0.0)))
    assert [g['weight_decay'] for g in wrapper.optimizer.param_groups] == [0.1] * 6


def test_a_hand_expanded_dcn_offset_conv_keeps_dcn_offset_lr_mult():
    from mmcv.ops import ModulatedDeformConv2dPack
    dcn = ModulatedDeformConv2dPack(8, 8, 3, padding=1)
    dcn.conv_offset = ExpandConv2d.from_conv(dcn.conv_offset, strategy='cl', ratio=2)
    net = nn.Sequential(dcn)
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.01), paramwise_cfg=dict(dcn_offset_lr_mult=0.1)))
    rates = group_lrs(wrapper, net)
    assert {n for n in rates if 'conv_offset' in n} and all(
        rate == pytest.approx(0.001) for n, rate in rates.items() if 'conv_offset' in n)
    assert rates['0.weight'] == pytest.approx(0.01)


def test_a_custom_key_naming_a_compact_parameter_of_an_expanded_layer_is_refused():
    net = expanded_tiny_net()
    with pytest.raises(ValueError, match=r"custom_keys: 'conv.weight' names a parameter of "
                                         r"'conv', an expanded layer .* use the module path "
                                         r"'conv'"):
        build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                      optimizer=dict(type='SGD', lr=0.01),
                                      paramwise_cfg=dict(custom_keys={
                                          'conv.weight': dict(lr_mult=0.0)})))
    # The module path reaches every factor; keys of compact layers still work.
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor', optimizer=dict(type='SGD', lr=0.01),
        paramwise_cfg=dict(custom_keys={'conv': dict(lr_mult=0.0),
                                        'head.weight': dict(lr_mult=0.5)})))
    rates = group_lrs(wrapper, net)
    assert all(rate == 0.0 for name, rate in rates.items() if name.startswith('conv.'))
    assert rates['head.weight'] == pytest.approx(0.005)



def nested_stem_and_fc_net():
    """An expanded conv at ``backbone.stem`` and an expanded linear at ``fc``."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.backbone = nn.Sequential()
    net.backbone.stem = nn.Conv2d(3, 8, 3)
    net.fc = nn.Linear(8, 4)
    expand_mm.expand_model(net, strategy='cl', ratio=2, expand_linear=True)
    return net


def build_with_custom_key(net, key):
    return build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                         optimizer=dict(type='SGD', lr=0.01),
                                         paramwise_cfg=dict(custom_keys={
                                             key: dict(lr_mult=0.0)})))


def test_the_refusal_of_a_compact_key_names_the_real_factors_of_an_expanded_linear():
    """An expanded Linear's factors are ``linears.N``, not ``convs.N``."""
    net = nested_stem_and_fc_net()
    with pytest.raises(ValueError, match=r"'fc.bias' names a parameter of 'fc', .*"
                                         r"\(fc\.linears\.0\.weight, \.\.\.\)"):
        build_with_custom_key(net, 'fc.bias')


def test_a_custom_key_that_was_a_substring_of_a_compact_parameter_name_is_refused():
    """mmengine matches custom_keys as substrings: 'stem.weight' matched the compact
    'backbone.stem.weight' and would now silently match nothing."""
    net = nested_stem_and_fc_net()
    with pytest.raises(ValueError, match=r"custom_keys: 'stem.weight' names a parameter of "
                                         r"'backbone.stem', .*\(backbone\.stem\.convs\.0\."
                                         r"weight, \.\.\.\).* use the module path "
                                         r"'backbone.stem'"):
        build_with_custom_key(net, 'stem.weight')
    # A key that still matches factor parameters is the user's to give.
    rates = group_lrs(build_with_custom_key(net, 'stem'), net)
    assert all(rate == 0.0 for name, rate in rates.items() if 'stem' in name)
    assert rates['fc.linears.0.weight'] == pytest.approx(0.01)
