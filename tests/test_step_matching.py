"""factor_lr='matched': every step moves the composed kernel as far, relatively, as Adam moves the compact one."""
import copy

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from expand_mm.errors import ConfigError
from expand_mm.optim.step_matching import (SHADOW_KEYS, STEP_SCALE_KEY, compact_adam_step,
                                           scale_correction)
from expanded_layer_cases import LAYERS

# The stated factor: over steps 30-40 the composed kernel's mean relative move
# lies within it of the compact layer's, trained alongside from its own start.
WITHIN = 1.5
STEPS = 40
LR = 3e-3


class Holder(nn.Module):
    """One layer as a model, so the optim wrapper constructor sees it."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def wrapper_for(model, rule='matched', optimizer='AdamW'):
    return build_optim_wrapper(model, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type=optimizer, lr=LR, weight_decay=0.01),
        paramwise_cfg=dict(factor_lr=rule)))


def relative_moves(module, wrapper, inputs, target, steps=STEPS):
    """Relative move of ``module.weight`` at each of ``steps`` optimizer steps on an MSE loss."""
    moves = []
    for _ in range(steps):
        before = module.weight.detach().clone()
        wrapper.update_params(((module(inputs) - target) ** 2).mean())
        moves.append(float((module.weight.detach() - before).norm() / before.norm()))
    return moves


def late_move_ratio(name, keep, rule='matched'):
    """Mean late relative move of the expanded layer's kernel over the compact layer's."""
    make_compact, expand, shape = LAYERS[name]
    torch.manual_seed(0)
    compact = make_compact(16)
    inputs = torch.randn(*shape(16))
    target = torch.randn_like(compact(inputs))
    expanded = Holder(expand(copy.deepcopy(compact), keep))
    compact_moves = relative_moves(compact, build_optim_wrapper(compact, dict(
        optimizer=dict(type='AdamW', lr=LR, weight_decay=0.01))), inputs, target)
    expanded_moves = relative_moves(expanded.layer, wrapper_for(expanded, rule), inputs, target)
    return sum(expanded_moves[-10:]) / sum(compact_moves[-10:])


@pytest.mark.parametrize('keep', [False, True], ids=['fresh', 'compact-init'])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_the_composed_kernel_moves_like_the_compact_one(name, keep):
    ratio = late_move_ratio(name, keep)
    assert 1 / WITHIN < ratio < WITHIN, ratio


@pytest.mark.parametrize('name', ['cl-3x3', 'depthwise'])
def test_the_fixed_rule_alone_moves_a_compact_initialised_chain_too_little(name):
    # What the running scale corrects: the fixed fan-in rule with its default
    # multiplier moves these layers 0.41x and 0.18x as far as the compact one.
    assert late_move_ratio(name, keep=True, rule='fan_in') < 1 / WITHIN


@pytest.mark.parametrize('optimizer', ['AdamW', 'Adam'])
def test_the_shadow_step_is_the_step_adam_takes_on_the_compact_kernel(optimizer):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 4, 3, 3))
    real = getattr(torch.optim, optimizer)([weight], lr=0.01, weight_decay=0.1)
    group = dict(real.param_groups[0])
    state = {}
    for _ in range(3):
        grad = torch.randn_like(weight)
        before = weight.detach().clone()
        step, norm = compact_adam_step(grad, before, state, group, optimizer == 'AdamW',
                                       reference_rms=1.0)
        weight.grad = grad
        real.step()
        assert step == pytest.approx(float((weight.detach() - before).pow(2).mean().sqrt()),
                                     rel=1e-5)
    assert int(state[SHADOW_KEYS[2]]) == 3 and norm != 1.0


def test_a_correction_is_bounded_and_ignores_a_step_that_did_not_move():
    assert scale_correction(8.0, 1.0, gain=1.0) == pytest.approx(torch.log(torch.tensor(2.0)))
    assert scale_correction(1.0, 0.0) == 0.0
    assert scale_correction(float('nan'), 1.0) == 0.0


def train(model, wrapper, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        wrapper.update_params(model(torch.randn(4, 16, 8, 8)).pow(2).mean())


def test_a_resumed_optimizer_keeps_the_scales_and_the_shadow_state():
    torch.manual_seed(0)
    model = Holder(LAYERS['cl-3x3'][1](LAYERS['cl-3x3'][0](16), False))
    wrapper = wrapper_for(model)
    train(model, wrapper, 5, seed=1)
    saved_model, saved_optim = copy.deepcopy(model.state_dict()), copy.deepcopy(wrapper.state_dict())
    scales = [g[STEP_SCALE_KEY] for g in saved_optim['param_groups'] if STEP_SCALE_KEY in g]
    assert scales and any(s != 1.0 for s in scales)
    train(model, wrapper, 3, seed=2)

    resumed = Holder(LAYERS['cl-3x3'][1](LAYERS['cl-3x3'][0](16), False))
    resumed.load_state_dict(saved_model)
    resumed_wrapper = wrapper_for(resumed)
    resumed_wrapper.load_state_dict(saved_optim)
    train(resumed, resumed_wrapper, 3, seed=2)
    assert resumed_wrapper.step_matched_rates.scales() == wrapper.step_matched_rates.scales()
    assert torch.equal(resumed.layer.weight, model.layer.weight)


def test_sgd_is_refused_naming_the_key_and_what_works():
    model = Holder(LAYERS['linear'][1](LAYERS['linear'][0](16), False))
    with pytest.raises(ConfigError, match="factor_lr='matched'.*SGD.*'fan_in'"):
        wrapper_for(model, optimizer='SGD')


def test_a_copy_of_the_model_does_not_feed_the_rule():
    model = Holder(LAYERS['linear'][1](LAYERS['linear'][0](16), False))
    wrapper_for(model)
    assert model.layer.composed_grad_tap is not None
    assert copy.deepcopy(model).layer.composed_grad_tap is None
