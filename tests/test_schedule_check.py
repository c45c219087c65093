"""A scheduler with an absolute eta_min undoes the per-factor learning rates: reported."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS

from expand_mm.hooks import ContractCheckpointHook
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
    (dict(type='PolyLR', eta_min=1e-4), 'eta_min=0'),
])
def test_absolute_eta_min_with_scaled_factor_rates_is_named(cfg, instead):
    net = expanded_net(torch.float32)
    wrapper = wrapper_of(net, ADAMW)
    (problem,) = absolute_floor_problems(net, wrapper, [scheduler(wrapper, **cfg)])
    assert f'param_scheduler[0] ({cfg["type"]}, eta_min=' in problem
    assert 'factor groups' in problem and f'Use {instead}' in problem
    if cfg['type'] == 'PolyLR':  # PolyLR has no eta_min_ratio to suggest
        assert 'eta_min_ratio' not in problem


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


def test_contract_checkpoint_hook_warns_at_the_start_of_training(tmp_path):
    runner = toy_runner(tmp_path, 'factors', param_scheduler=[
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1),
        dict(type='CosineAnnealingLR', T_max=1, eta_min=1e-6, by_epoch=False, begin=1,
             end=2)])
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    warnings = []
    runner.logger.warning = warnings.append
    ContractCheckpointHook().before_train(runner)
    (warning,) = warnings
    assert warning.startswith('ContractCheckpointHook: param_scheduler[1] (CosineAnnealingLR')
    assert 'eta_min_ratio=0.0001' in warning
