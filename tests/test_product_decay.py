"""weight_decay_on='product': the decay of the composed kernel, applied to the factors."""
import copy

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIMIZERS
from mmengine.runner import Runner
from torch import nn

import expand_mm
from expand_mm.optim.product_decay import FACTOR_LR_MULT_KEY, PRODUCT_DECAY_KEY

OTHER = {'factors': 'product', 'product': 'factors'}


class TinyNet(nn.Module):
    """conv (expanded, with bias) -> ReLU -> linear (expanded) next to a compact head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.head(torch.relu(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def expanded_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = TinyNet()
    expand_mm.expand_model(net, strategy='cl', ratio=2, include=['conv', 'fc'],
                           expand_linear=True)
    return net.to(dtype)


def build(net, optimizer, **paramwise):
    return build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor', optimizer=optimizer,
        paramwise_cfg=dict(dict(weight_decay_on='product'), **paramwise)))


def factor_names(net):
    return [n for n, _ in net.named_parameters()
            if ('convs.' in n or 'linears.' in n) and n.endswith('.weight')]


def groups_by_name(wrapper, net):
    by_id = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    return {n: by_id[id(p)] for n, p in net.named_parameters()}


def loss_of(net, x):
    return net(x).square().sum()


def decay_grads(net, decays):
    """Autograd of the sum over layers of decay / 2 * ||W_composed||^2 alone."""
    net.zero_grad()
    penalty = sum(decays[path] / 2 * layer._compose(None)[0].square().sum()
                  for path, layer in expand_mm.expanded_layers(net))
    penalty.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


def loss_grads(net, x):
    net.zero_grad()
    loss_of(net, x).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


def expected_grads(net, x, decays):
    """Autograd of loss + sum over layers of decay / 2 * ||W_composed||^2, float64."""
    net.zero_grad()
    loss = loss_of(net, x)
    for path, layer in expand_mm.expanded_layers(net):
        loss = loss + decays[path] / 2 * layer._compose(None)[0].square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


def test_factor_grads_after_a_step_are_those_of_the_product_penalty():
    net = expanded_net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    # conv factors decay at 0.1 * 0.5 (custom_keys), fc factors at 0.1
    wrapper = build(net, dict(type='SGD', lr=0.01, weight_decay=0.1),
                    custom_keys={'conv': dict(decay_mult=0.5)})
    expected = expected_grads(net, x, {'conv': 0.05, 'fc': 0.1})
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    groups = groups_by_name(wrapper, net)
    loss_of(net, x).backward()
    wrapper.optimizer.step()
    for name, param in net.named_parameters():
        if name in factor_names(net):
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)
            # the factor's own decay is gone: the SGD update is the gradient alone
            torch.testing.assert_close(param.detach(), before[name] - 0.01 * expected[name],
                                       rtol=1e-10, atol=1e-12)
        else:  # biases and the compact head: the loss gradient, their own decay kept
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)
            assert groups[name]['weight_decay'] > 0


def test_factor_weight_groups_get_zero_decay_and_the_rest_is_untouched():
    net = expanded_net()
    reference = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.05),
        paramwise_cfg=dict(bias_decay_mult=0.0)))
    wrapper = build(net, dict(type='AdamW', lr=0.01, weight_decay=0.05), bias_decay_mult=0.0)
    ref, got = groups_by_name(reference, net), groups_by_name(wrapper, net)
    factors = factor_names(net)
    assert len(factors) == 6
    for name in ref:
        if name in factors:
            assert got[name]['weight_decay'] == 0.0
            assert got[name][PRODUCT_DECAY_KEY] == pytest.approx(0.05)
            assert got[name]['lr'] == pytest.approx(ref[name]['lr'])  # factor rates kept
            assert got[name]['lr'] / got[name][FACTOR_LR_MULT_KEY] == pytest.approx(0.01)
        else:
            assert got[name]['weight_decay'] == ref[name]['weight_decay'], name
            assert PRODUCT_DECAY_KEY not in got[name]
    assert wrapper.product_weight_decay.style == 'decoupled'


def test_default_factors_installs_nothing_but_the_resume_check():
    net = expanded_net()
    wrapper = build_optim_wrapper(net, dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, weight_decay=0.1)))
    assert not wrapper.optimizer._optimizer_step_pre_hooks
    assert not hasattr(wrapper, 'product_weight_decay')
    assert len(wrapper.optimizer.param_groups) == 1  # as the default constructor
    assert len(wrapper.optimizer._optimizer_load_state_dict_pre_hooks) == 1
    # a model without expanded layers: nothing to check
    compact = build_optim_wrapper(TinyNet(), dict(
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, weight_decay=0.1)))
    assert not compact.optimizer._optimizer_load_state_dict_pre_hooks
    # frozen factors (an expanded teacher): both settings save the same groups
    frozen = expanded_net()
    for _, layer in expand_mm.expanded_layers(frozen):
        layer.requires_grad_(False)
    wrapper = build(frozen, dict(type='AdamW', lr=0.01, weight_decay=0.1))
    assert not wrapper.optimizer._optimizer_load_state_dict_pre_hooks


def test_bad_value_and_unknown_optimizer_are_named():
    net = expanded_net()
    with pytest.raises(ValueError, match=r"paramwise_cfg.weight_decay_on='prod' must be one "
                                         r"of \('factors', 'product'\)"):
        build(net, dict(type='SGD', lr=0.1), weight_decay_on='prod')

    @OPTIMIZERS.register_module(force=True)
    class OddSGD(torch.optim.SGD):
        """An optimizer whose decay semantics the hook cannot know."""

    with pytest.raises(ValueError, match=r"weight_decay_on='product' does not know how OddSGD"):
        build(net, dict(type='OddSGD', lr=0.1, weight_decay=0.1))
    # nothing to move: no error, no hook
    wrapper = build(net, dict(type='OddSGD', lr=0.1))
    assert not wrapper.optimizer._optimizer_step_pre_hooks
    with pytest.raises(ValueError, match='no expanded layer'):
        build(TinyNet(), dict(type='SGD', lr=0.1, weight_decay=0.1))


def test_decoupled_decay_shrinks_the_composed_kernel_like_adamw():
    net = expanded_net()
    wrapper = build(net, dict(type='AdamW', lr=0.01, weight_decay=0.5))
    layers = expand_mm.expanded_layers(net)
    seen = {}

    def record(optimizer, args, kwargs):  # runs after the product decay's hook
        seen.update({p: l._compose(None)[0].detach().clone() for p, l in layers})

    before = {p: l._compose(None)[0].detach().clone() for p, l in layers}
    wrapper.optimizer.register_step_pre_hook(record)
    loss_of(net, torch.randn(2, 3, 6, 6, dtype=torch.float64)).backward()
    wrapper.optimizer.step()
    for path, _ in layers:  # compact rate 0.01, not the factors' scaled rates
        torch.testing.assert_close(seen[path], (1 - 0.01 * 0.5) * before[path])


def test_decoupled_decay_is_continuous_when_one_factor_does_not_decay():
    """A factor with decay 0 acts as one with a tiny decay: the root is over every
    trained factor, so the composed kernel shrinks by (1 - lr * wd) ** (2 / 3)."""
    scales = []
    for factor_decay_mult in (1e-9, 0.0):
        torch.manual_seed(0)
        net = nn.Sequential()
        net.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        expand_mm.expand_model(net, strategy='cl', ratio=4)
        wrapper = build_optim_wrapper(net, dict(
            constructor='ExpandNetOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=0.1, weight_decay=0.1),
            paramwise_cfg=dict(weight_decay_on='product',
                               custom_keys={'conv.convs.0': dict(decay_mult=factor_decay_mult)})))
        before = net.conv.composed()[0].detach().clone()
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        wrapper.optimizer.step()
        scales.append(float(net.conv.composed()[0].norm() / before.norm()))
    assert scales == pytest.approx([0.99 ** (2 / 3)] * 2, rel=1e-6)


def test_update_params_with_accumulation_and_deferred_grads_decays_once_per_step():
    net = expanded_net()
    for _, layer in expand_mm.expanded_layers(net):
        layer.set_mode('online')
    x1, x2 = (torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(2))
    # expected: the mean of the two losses' gradients plus one product decay
    g1, g2 = loss_grads(net, x1), loss_grads(net, x2)
    gd = decay_grads(net, {'conv': 0.2, 'fc': 0.2})
    wrapper = build_optim_wrapper(net, dict(
        type='OptimWrapper', accumulative_counts=2,
        constructor='ExpandNetOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, weight_decay=0.2),
        paramwise_cfg=dict(weight_decay_on='product')))
    calls = []
    wrapper.optimizer.register_step_pre_hook(lambda *a: calls.append(1))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    with expand_mm.deferred_factor_grads(net):
        wrapper.update_params(loss_of(net, x1))
        assert not calls
        wrapper.update_params(loss_of(net, x2))
    assert len(calls) == 1
    for name, param in net.named_parameters():
        decay = gd[name] if name in factor_names(net) else 0.2 * before[name]
        grad = (g1[name] + g2[name]) / 2 + decay
        torch.testing.assert_close(param.detach(), before[name] - 0.1 * grad,
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('optimizer', [dict(type='SGD', lr=0.1, weight_decay=0.5),
                                       dict(type='AdamW', lr=0.01, weight_decay=0.5)])
def test_fused_optimizer_under_grad_scaler_decays_like_the_unscaled_step(optimizer):
    # A fused optimizer unscales inside its step (GradScaler sets grad_scale /
    # found_inf on it), so the hook sees scaled gradients.
    x = torch.randn(2, 3, 6, 6)
    after = []
    for fused in (False, True):
        net = expanded_net(torch.float32)
        wrapper = build(net, dict(optimizer, fused=fused))
        scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
        scaler.scale(loss_of(net, x)).backward()
        scaler.step(wrapper.optimizer)
        after.append([p.detach().clone() for p in net.parameters()])
    for unfused, fused in zip(*after):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-7)
    # A step with an inf is skipped whole: no decoupled shrink either.
    net = expanded_net(torch.float32)
    wrapper = build(net, dict(optimizer, fused=True))
    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(loss_of(net, x) * float('inf')).backward()
    scaler.step(wrapper.optimizer)
    for old, param in zip(before, net.parameters()):
        torch.testing.assert_close(param.detach(), old, rtol=0, atol=0)


def test_coupled_decay_still_decays_under_maximize():
    # maximize=True: SGD steps along +grad, and its L2 term, added after the
    # negation, still pulls the weights towards 0.
    net = expanded_net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    wrapper = build(net, dict(type='SGD', lr=0.01, weight_decay=0.1, maximize=True))
    g, gd = loss_grads(net, x), decay_grads(net, {'conv': 0.1, 'fc': 0.1})
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss_of(net, x).backward()
    wrapper.optimizer.step()
    for name, param in net.named_parameters():
        decay = gd[name] if name in factor_names(net) else 0.1 * before[name]
        torch.testing.assert_close(param.detach(), before[name] + 0.01 * g[name] - 0.01 * decay,
                                   rtol=1e-10, atol=1e-12)


def stepped(weight_decay_on):
    """A wrapper of ``expanded_net()`` after one AdamW step (per-parameter groups either way)."""
    net = expanded_net()
    wrapper = build(net, dict(type='AdamW', lr=0.01, weight_decay=0.5),
                    weight_decay_on=weight_decay_on)
    loss_of(net, torch.randn(2, 3, 6, 6, dtype=torch.float64)).backward()
    wrapper.step()
    return wrapper


def assert_names_both_settings(message, saved, current):
    for part in ('paramwise_cfg.weight_decay_on', f'trained with weight_decay_on={saved!r}',
                 f'current config sets weight_decay_on={current!r}',
                 f'To resume, set paramwise_cfg.weight_decay_on={saved!r}', 'load_from='):
        assert part in message, part


def test_resumed_optimizer_state_brings_its_product_decay_keys():
    wrapper = stepped('product')
    resumed = build(expanded_net(), dict(type='AdamW', lr=0.02, weight_decay=0.1))
    resumed.load_state_dict(wrapper.state_dict())
    for saved, loaded in zip(wrapper.optimizer.param_groups, resumed.optimizer.param_groups):
        for key in (PRODUCT_DECAY_KEY, FACTOR_LR_MULT_KEY, 'weight_decay', 'lr'):
            assert loaded.get(key) == saved.get(key), key


@pytest.mark.parametrize('saved', ['factors', 'product'])
def test_resuming_a_state_of_the_other_weight_decay_on_is_refused_before_loading(saved):
    # Both settings build the same groups under AdamW, so torch alone would
    # load the saved hyper-parameters and silently switch the regime.
    state = stepped(saved).state_dict()
    current = OTHER[saved]
    resumed = build(expanded_net(), dict(type='AdamW', lr=0.02, weight_decay=0.1),
                    weight_decay_on=current)
    before = copy.deepcopy(resumed.optimizer.state_dict())
    with pytest.raises(ValueError) as err:
        resumed.load_state_dict(state)
    assert_names_both_settings(str(err.value), saved, current)
    assert resumed.optimizer.state_dict() == before  # refused before anything was loaded


class ExpandedToy(BaseModel):
    """``expanded_net()`` as an MMEngine model: the loss of :func:`loss_of`."""

    def __init__(self):
        super().__init__()
        self.net = expanded_net(torch.float32)

    def forward(self, inputs, data_samples=None, mode='loss'):
        return dict(loss=loss_of(self.net, inputs))


def toy_runner(work_dir, weight_decay_on, max_iters=1, **kwargs):
    """A real Runner on ``ExpandedToy`` (AdamW), saving a checkpoint every iteration."""
    return Runner(
        model=ExpandedToy(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=[dict(inputs=torch.randn(3, 6, 6))] * 2, batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(constructor='ExpandNetOptimWrapperConstructor',
                           optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.5),
                           paramwise_cfg=dict(weight_decay_on=weight_decay_on)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                           **kwargs.pop('default_hooks', {})),
        **kwargs)


@pytest.mark.slow
def test_runner_resume_of_a_factors_checkpoint_into_a_product_run_is_refused(tmp_path):
    toy_runner(tmp_path, 'factors').train()
    resumed = toy_runner(tmp_path, 'product', max_iters=2, resume=True,
                         load_from=str(tmp_path / 'iter_1.pth'))
    with pytest.raises(ValueError) as err:
        resumed.train()
    assert_names_both_settings(str(err.value), 'factors', 'product')
    assert not (tmp_path / 'iter_2.pth').exists()
    # the matching setting resumes and trains on
    toy_runner(tmp_path, 'factors', max_iters=2, resume=True,
               load_from=str(tmp_path / 'iter_1.pth')).train()
    assert (tmp_path / 'iter_2.pth').exists()


def manual_l2(net, weight_decay, weight_decay_on):
    """weight_decay / 2 * ||.||^2 over the composed kernels ('product') or every factor."""
    from expand_mm.optim.product_decay import factor_weights
    layers = expand_mm.expanded_layers(net)
    factor_ids = {id(p) for _, layer in layers for p in factor_weights(layer)}
    total = sum(p.double().square().sum() for p in net.parameters()
                if weight_decay_on == 'factors' or id(p) not in factor_ids)
    if weight_decay_on == 'product':
        total += sum(layer._compose(None)[0].double().square().sum() for _, layer in layers)
    return float(weight_decay / 2 * total)


@pytest.mark.parametrize('weight_decay_on', ['factors', 'product'])
def test_weight_decay_term_is_the_l2_of_what_the_optimizer_decays(weight_decay_on):
    from expand_mm.optim.product_decay import weight_decay_term
    net = expanded_net()
    wrapper = build(net, dict(type='SGD', lr=0.1, weight_decay=0.3),
                    weight_decay_on=weight_decay_on)
    layers = expand_mm.expanded_layers(net)
    expected = manual_l2(net, 0.3, weight_decay_on)
    assert weight_decay_term(wrapper.optimizer, layers) == pytest.approx(expected, rel=1e-12)
    assert manual_l2(net, 0.3, 'factors') != pytest.approx(manual_l2(net, 0.3, 'product'))
    # decay_mult=0 on the norm-free biases leaves them out
    no_bias = build(net, dict(type='SGD', lr=0.1, weight_decay=0.3),
                    weight_decay_on=weight_decay_on, bias_decay_mult=0.0)
    assert weight_decay_term(no_bias.optimizer, layers) < expected


@pytest.mark.slow
@pytest.mark.parametrize('weight_decay_on', ['factors', 'product'])
def test_weight_decay_term_hook_logs_loss_l2_at_the_logging_steps(tmp_path, weight_decay_on):
    import json
    from expand_mm.optim.product_decay import weight_decay_term
    runner = toy_runner(tmp_path, weight_decay_on, max_iters=4,
                        default_hooks=dict(logger=dict(type='LoggerHook', interval=2)),
                        custom_hooks=[dict(type='WeightDecayTermHook')],
                        visualizer=dict(type='Visualizer', name=f'l2_{weight_decay_on}',
                                        vis_backends=[dict(type='LocalVisBackend')]))
    runner.train()
    lines = (tmp_path / runner.timestamp / 'vis_data' / 'scalars.json').read_text()
    logged = [json.loads(line) for line in lines.splitlines() if 'loss_l2' in line]
    assert [r['step'] for r in logged] == [2, 4]
    expected = weight_decay_term(runner.optim_wrapper.optimizer,
                                 expand_mm.expanded_layers(runner.model.net))
    assert logged[-1]['loss_l2'] == pytest.approx(expected, rel=1e-6)


def test_weight_decay_term_hook_refuses_a_bad_interval():
    from expand_mm.errors import ConfigError
    from expand_mm.hooks import WeightDecayTermHook
    with pytest.raises(ConfigError, match='interval'):
        WeightDecayTermHook(interval=0)
