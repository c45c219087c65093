"""A scheduler with an absolute eta_min undoes the per-factor learning rates: reported."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS

from expand_mm.hooks import ExpandNetCheckHook
from expand_mm.optim.product_decay import FACTOR_BASE_LR_KEY
from expand_mm.optim.schedule_check import absolute_floor_problems
from test_product_decay import TinyNet, expanded_net, toy_runner


def wrapper_of(net, optimizer):
    return build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                         optimizer=optimizer))


def scheduler(wrapper, **cfg):
    return PARAM_SCHEDULERS.build(dict(cfg, by_epoch=False, begin=0, end=10),
                                  default_args=dict(optimizer=wrapper))


ADAMW = dict(type='AdamW', lr=0.01, weight_decay=0.01)


@pytest.mark.parametrize('cfg, instead', [
    (dict(type='CosineAnnealingLR', T_max=10, eta_min=1e-5), 'eta_min_ratio=0.001'),
    (dict(type='PolyLR', eta_min=1e-4), "type='PolyLRRatio' (expand_mm) with eta_min_ratio=0.01"),
])
def test_absolute_eta_min_with_scaled_factor_rates_is_named(cfg, instead):
    net = expanded_net(torch.float32)
    wrapper = wrapper_of(net, ADAMW)
    (problem,) = absolute_floor_problems(net, wrapper, [scheduler(wrapper, **cfg)])
    assert f'param_scheduler[0] ({cfg["type"]}, eta_min=' in problem
    assert 'factor groups' in problem and f'Use {instead}' in problem


def test_one_cycle_with_one_eta_max_and_a_plateau_floor_are_named():
    """OneCycleLR overwrites every group's rates (initial_lr included) from one eta_max;
    ReduceOnPlateauLR's min_value is an absolute floor."""
    net = expanded_net(torch.float32)
    wrapper = wrapper_of(net, ADAMW)
    (problem,) = absolute_floor_problems(net, wrapper, [scheduler(
        wrapper, type='OneCycleLR', eta_max=0.01, total_steps=10)])
    assert 'param_scheduler[0] (OneCycleLR, eta_max=0.01)' in problem
    assert 'from the first step' in problem and 'one value per param group' in problem
    groups = wrapper.optimizer.param_groups
    assert len({g['initial_lr'] for g in groups}) == 1  # why the recorded multiplier is read
    wrapper = wrapper_of(net, ADAMW)
    plateau = PARAM_SCHEDULERS.build(dict(type='ReduceOnPlateauLR', monitor='loss',
                                          min_value=1e-5, by_epoch=True),
                                     default_args=dict(optimizer=wrapper))
    (problem,) = absolute_floor_problems(net, wrapper, [plateau])
    assert '(ReduceOnPlateauLR, min_value=1e-05)' in problem
    assert 'Use min_value=0' in problem
    # One floor per group, proportional to each group's own rate, keeps the ratios.
    wrapper = wrapper_of(net, ADAMW)
    proportional = PARAM_SCHEDULERS.build(
        dict(type='ReduceOnPlateauLR', monitor='loss', by_epoch=True,
             min_value=[1e-3 * g['lr'] for g in wrapper.optimizer.param_groups]),
        default_args=dict(optimizer=wrapper.optimizer))
    assert absolute_floor_problems(net, wrapper, [proportional]) == []


def test_rates_scaled_by_the_users_custom_keys_are_not_blamed_on_the_constructor():
    """SGD leaves the factor rates alone; a custom_keys lr_mult is the user's, as on a
    compact model, and an absolute eta_min does to it what it does there."""
    net = expanded_net(torch.float32)
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9),
        paramwise_cfg=dict(custom_keys={'': dict(lr_mult=0.1)})))
    assert all(g['lr'] == pytest.approx(0.001) for g in wrapper.optimizer.param_groups)
    assert absolute_floor_problems(net, wrapper, [scheduler(
        wrapper, type='CosineAnnealingLR', T_max=10, eta_min=1e-5)]) == []


@pytest.mark.parametrize('case', ['ratio', 'zero', 'sgd', 'compact'])
def test_schedules_that_keep_the_factor_rates_pass(case):
    net = TinyNet() if case == 'compact' else expanded_net(torch.float32)
    optimizer = dict(type='SGD', lr=0.01, momentum=0.9) if case == 'sgd' else ADAMW
    wrapper = wrapper_of(net, optimizer)
    cfg = dict(type='CosineAnnealingLR', T_max=10, eta_min=1e-5)
    if case == 'ratio':
        cfg = dict(type='CosineAnnealingLR', T_max=10, eta_min_ratio=1e-3)
    elif case == 'zero':
        cfg['eta_min'] = 0.0
    assert absolute_floor_problems(net, wrapper, [scheduler(wrapper, **cfg)]) == []


def test_check_hook_warns_at_the_start_of_training(tmp_path):
    runner = toy_runner(tmp_path, 'factors', param_scheduler=[
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1),
        dict(type='CosineAnnealingLR', T_max=1, eta_min=1e-6, by_epoch=False, begin=1,
             end=2)])
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    warnings = []
    runner.logger.warning = warnings.append
    ExpandNetCheckHook().before_train(runner)
    (warning,) = [w for w in warnings if 'param_scheduler' in w]
    assert warning.startswith('ExpandNetCheckHook: param_scheduler[1] (CosineAnnealingLR')
    assert 'eta_min_ratio=0.0001' in warning


def test_poly_lr_ratio_ends_every_group_at_the_same_fraction_of_its_own_rate():
    """PolyLRRatio: PolyLR's curve, each group towards ratio x its initial rate; a base
    group follows PolyLR(eta_min=ratio x base) exactly."""
    import expand_mm.optim  # noqa: F401  (registers PolyLRRatio)
    net = expanded_net(torch.float32)
    wrapper = wrapper_of(net, ADAMW)
    twin = wrapper_of(net, ADAMW)
    ratio_sched = scheduler(wrapper, type='PolyLRRatio', eta_min_ratio=0.01, power=0.9)
    stock = scheduler(twin, type='PolyLR', eta_min=0.01 * 0.01, power=0.9)
    assert absolute_floor_problems(net, wrapper, [ratio_sched]) == []
    initial = [g['initial_lr'] for g in wrapper.optimizer.param_groups]
    assert len(set(initial)) > 1  # scaled factor groups and base groups
    for _ in range(9):
        wrapper.optimizer.step()
        ratio_sched.step()
        stock.step()
    for group, start in zip(wrapper.optimizer.param_groups, initial):
        assert group['lr'] == pytest.approx(0.01 * start, rel=1e-6)
    base = [i for i, lr in enumerate(initial) if lr == pytest.approx(0.01)]
    assert base
    for i in base:
        assert wrapper.optimizer.param_groups[i]['lr'] == pytest.approx(
            twin.optimizer.param_groups[i]['lr'], rel=1e-9)
    with pytest.raises(ValueError, match=r'eta_min_ratio=1\.5 must be a number in \[0, 1\)'):
        scheduler(wrapper, type='PolyLRRatio', eta_min_ratio=1.5)
    with pytest.raises(ValueError, match='eta_min_ratio or eta_min, not both'):
        scheduler(wrapper, type='PolyLRRatio', eta_min_ratio=0.1, eta_min=1e-4)


def test_the_suggested_ratio_follows_the_rates_the_groups_start_from():
    """--auto-scale-lr scales every group's rate, not optimizer.defaults['lr']: the
    suggested eta_min_ratio must end the compact groups at eta_min all the same."""
    net = expanded_net(torch.float32)
    for recorded in (True, False):  # False: groups of a checkpoint saved before the record
        wrapper = wrapper_of(net, ADAMW)
        for group in wrapper.optimizer.param_groups:  # what mmengine's scale_lr does
            group['lr'] *= 0.0625
            if not recorded:
                group.pop(FACTOR_BASE_LR_KEY, None)
        (problem,) = absolute_floor_problems(net, wrapper, [scheduler(
            wrapper, type='CosineAnnealingLR', T_max=10, eta_min=1e-5)])
        assert f'eta_min_ratio={1e-5 / (0.01 * 0.0625):.4g}' in problem


def backbone_and_head(num_backbone_convs):
    """``num_backbone_convs`` expanded convs under ``backbone``, one under ``head``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.backbone = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1)
                                         for _ in range(num_backbone_convs)])
    net.head = torch.nn.Conv2d(8, 8, 3, padding=1)
    import expand_mm
    expand_mm.expand_model(net, strategy='cl', ratio=4)
    return net


def wrapper_with_lr_mult(net, custom_keys):
    return build_optim_wrapper(net, dict(constructor='ExpandNetOptimWrapperConstructor',
                                         optimizer=ADAMW,
                                         paramwise_cfg=dict(custom_keys=custom_keys)))


@pytest.mark.parametrize('cfg', [
    dict(type='CosineAnnealingLR', T_max=10, eta_min=1e-5),
    dict(type='ReduceOnPlateauLR', monitor='loss', min_value=1e-5),
])
def test_factor_groups_frozen_by_lr_mult_zero_are_left_out_of_the_check(cfg):
    """custom_keys lr_mult=0 on the part holding most expanded layers gives their groups
    rate 0: no scaling to lose, and no rate to divide by (was ZeroDivisionError)."""
    def floor_problems(custom_keys):
        wrapper = wrapper_with_lr_mult(net, custom_keys)
        built = PARAM_SCHEDULERS.build(dict(cfg, by_epoch=cfg['type'] == 'ReduceOnPlateauLR'),
                                       default_args=dict(optimizer=wrapper))
        return absolute_floor_problems(net, wrapper, [built])

    net = backbone_and_head(3)
    (problem,) = floor_problems({'backbone': dict(lr_mult=0.0)})
    assert 'so the 6 factor groups' in problem  # the head's three factors, weight and bias
    if cfg['type'] == 'CosineAnnealingLR':
        assert 'eta_min_ratio=0.001' in problem
    # Every expanded layer frozen: nothing left that a floor could unscale.
    assert floor_problems({'': dict(lr_mult=0.0)}) == []


def test_the_suggested_ratio_is_eta_min_over_optimizer_lr_whatever_lr_mult_most_layers_have():
    """A custom_keys lr_mult on most expanded layers must not move the suggestion (it was
    the most common rate / multiplier of the factor groups), with --auto-scale-lr too."""
    net = backbone_and_head(3)
    for scale in (1.0, 0.0625):
        wrapper = wrapper_with_lr_mult(net, {'backbone': dict(lr_mult=0.1)})
        for group in wrapper.optimizer.param_groups:  # what mmengine's scale_lr does
            group['lr'] *= scale
        (problem,) = absolute_floor_problems(net, wrapper, [scheduler(
            wrapper, type='CosineAnnealingLR', T_max=10, eta_min=1e-5)])
        assert f'eta_min_ratio={1e-5 / (0.01 * scale):.4g} (' in problem
