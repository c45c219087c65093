"""factor_lr='calibrated': one adaptive step moves each composed kernel like the compact one."""
import copy

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from expand_mm import ExpandConv2d, factor_lr_multipliers
from expand_mm.errors import SetupError
from expand_mm.optim.factor_lr import CALIBRATION_KEY
from expand_mm.optim.lr_calibration import calibrated_multipliers, calibrated_scale
from expanded_layer_cases import LAYERS, kaiming_conv

# The stated factor: measured one-step relative moves of the composed kernel
# lie within it of the compact layer's (0.68..1.34 on these layers).
WITHIN = 1.5
# A fixed multiplier on the fan-in rule that matches one step of fresh dense
# 3x3 chains (the default of earlier versions), compared with the calibration.
ONE_STEP_MULT = 0.25


def relative_adam_step(module, multipliers, inputs, target, lr=1e-4):
    """Relative move of ``module.weight`` after one real Adam step on an MSE loss."""
    before = module.weight.detach().clone()
    groups = [dict(params=[p], lr=lr * m) for p, m in multipliers]
    optimizer = torch.optim.Adam(groups)
    ((module(inputs) - target) ** 2).mean().backward()
    optimizer.step()
    return float((module.weight.detach() - before).norm() / before.norm())


def factor_params(layer, multipliers):
    return [(p, m) for sub, m in zip(layer.sublayers, multipliers)
            for p in sub.parameters(recurse=False)]


def step_ratios(name, channels, keep):
    """(calibrated, fixed default) one-step moves of the composed kernel / the compact one's."""
    make_compact, expand, shape = LAYERS[name]
    torch.manual_seed(0)
    compact = make_compact(channels)
    inputs = torch.randn(*shape(channels))
    target = torch.randn_like(compact(inputs))
    twin = copy.deepcopy(compact)
    compact_step = relative_adam_step(twin, [(p, 1.0) for p in twin.parameters()], inputs, target)
    ratios = []
    for rule in ('calibrated', 'default'):
        torch.manual_seed(1)
        layer = expand(compact, keep)
        mults = (calibrated_multipliers(layer) if rule == 'calibrated' else
                 [m * ONE_STEP_MULT for m in factor_lr_multipliers(layer)])
        ratios.append(relative_adam_step(layer, factor_params(layer, mults), inputs, target)
                      / compact_step)
    return ratios


@pytest.mark.parametrize('keep', [False, True], ids=['fresh', 'compact-init'])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_one_adam_step_moves_the_composed_kernel_as_far_as_the_compact_layer(name, keep):
    calibrated, _ = step_ratios(name, 32, keep)
    assert 1 / WITHIN < calibrated < WITHIN, calibrated


def test_a_fixed_multiplier_under_steps_depthwise_and_compact_initialised_layers():
    # Why the rule is measured per layer: 0.25 was calibrated on fresh dense
    # 3x3 convs and is right there, but several times too small elsewhere.
    assert 1 / WITHIN < step_ratios('cl-3x3', 32, False)[1] < WITHIN
    assert step_ratios('depthwise', 32, False)[1] < 0.4
    assert step_ratios('cl-3x3', 32, True)[1] < 0.5


def test_the_scale_compares_with_the_compact_kernel_the_layer_stands_for():
    compact = kaiming_conv(16, 3)
    layer = ExpandConv2d.from_conv(compact, 'cl', 4)
    scale = calibrated_scale(layer)
    # A reference kernel twice as large halves the relative compact step to match.
    layer.compact_reference_rms *= 2
    assert calibrated_scale(layer) == pytest.approx(scale / 2)
    # Factorised from a kernel, the layer stands for that kernel.
    layer.set_compact(2 * compact.weight.detach(), compact.bias.detach())
    assert layer.compact_reference_rms == pytest.approx(
        float((2 * compact.weight).double().pow(2).mean().sqrt()))


class CalibratedToy(BaseModel):
    """A dense and a depthwise conv, expanded fresh, trained on an MSE loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dense = ExpandConv2d.from_conv(kaiming_conv(8, 3), 'cl', 4)
        self.depthwise = ExpandConv2d.from_conv(kaiming_conv(8, 3, groups=8), 'cl', 4)

    def forward(self, inputs, data_samples=None, mode='loss'):
        return dict(loss=self.depthwise(torch.relu(self.dense(inputs))).pow(2).mean())


def calibrated_runner(work_dir, max_iters=1, hooks=True, **kwargs):
    return Runner(
        model=CalibratedToy(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=[dict(inputs=torch.randn(8, 6, 6))] * 2, batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(constructor='ExpandNetOptimWrapperConstructor',
                           optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.01),
                           paramwise_cfg=dict(factor_lr='calibrated')),
        param_scheduler=dict(type='CosineAnnealingLR', T_max=4, eta_min_ratio=0.1,
                             by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False)),
        custom_hooks=[dict(type='FactorLRCalibrationHook')] if hooks else [], **kwargs)


def factor_groups(runner, path):
    layer = runner.model.get_submodule(path)
    ids = {id(p): i for i, sub in enumerate(layer.sublayers) for p in sub.parameters()}
    return [(ids[id(g['params'][0])], g) for g in runner.optim_wrapper.optimizer.param_groups
            if id(g['params'][0]) in ids]


@pytest.mark.slow
def test_runner_scales_each_layers_groups_and_what_the_scheduler_starts_from(tmp_path):
    runner = calibrated_runner(tmp_path)
    expected = {path: calibrated_multipliers(copy.deepcopy(runner.model.get_submodule(path)))
                for path in ('dense', 'depthwise')}
    runner.train()
    scheduler = runner.param_schedulers[0]
    groups = runner.optim_wrapper.optimizer.param_groups
    for path, mults in expected.items():
        for index, group in factor_groups(runner, path):
            assert group['initial_lr'] == pytest.approx(0.01 * mults[index], rel=1e-6)
            assert isinstance(group[CALIBRATION_KEY], float)
            position = next(i for i, g in enumerate(groups) if g is group)
            assert scheduler.base_values[position] == pytest.approx(group['initial_lr'])
    dense, depthwise = (expected['dense'][0], expected['depthwise'][0])
    assert depthwise > 2 * dense  # each layer has its own scale


@pytest.mark.slow
def test_a_resumed_run_keeps_its_calibrated_rates(tmp_path):
    calibrated_runner(tmp_path).train()
    first = [g['initial_lr'] for g in torch.load(
        tmp_path / 'iter_1.pth', weights_only=False)['optimizer']['param_groups']]
    resumed = calibrated_runner(tmp_path, max_iters=2, resume=True,
                                load_from=str(tmp_path / 'iter_1.pth'))
    resumed.train()
    assert [g['initial_lr'] for g in resumed.optim_wrapper.optimizer.param_groups] == first


@pytest.mark.slow
def test_training_without_the_hook_is_refused_at_the_first_step(tmp_path):
    with pytest.raises(SetupError, match="needs FactorLRCalibrationHook"):
        calibrated_runner(tmp_path, hooks=False).train()
    assert not (tmp_path / 'iter_1.pth').exists()
