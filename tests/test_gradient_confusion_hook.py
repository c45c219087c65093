"""GradientConfusionHook: the statistics of the analysis function, and no effect on training."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.runner import Runner

import expand_mm  # noqa: F401  (registers the hooks)
from data_factory import make_coco
from expand_mm.analysis import gradient_confusion, mm_loss_fn
from expand_mm.errors import ConfigError
from expand_mm.hooks import GradientConfusionHook
from expand_mm.models import deployable_model
from mm_test_utils import load_config, shrink_for_test
from wrapper_test_utils import ROOT

DIGITS = ROOT / 'projects/digits/configs/digits'
EXPANDNET = DIGITS / 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
COMPACT = DIGITS / 'yolo-lite_1xb16-900i_digits-det-64x64.py'
DIGIT_NAMES = tuple(str(d) for d in range(10))


def digits_runner(config: Path, tmp_path: Path, name: str, hook: dict | None,
                  max_iters: int = 4) -> Runner:
    """A runner of a digits config on 8 tiny COCO images, batch 2, ``max_iters`` iterations."""
    data_root = tmp_path / 'data'
    if not data_root.exists():
        make_coco(str(data_root), num_images=8, size=64, split='train',
                  class_names=DIGIT_NAMES)
    cfg = load_config(config)
    shrink_for_test(cfg, str(tmp_path / name), f'{data_root}/', (64, 64), max_iters)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=-1, save_last=False)
    cfg.default_hooks.pop('expand_contract', None)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.experiment_name = cfg.visualizer.name = name  # one visualiser (and dir) per run
    cfg.custom_hooks = [hook] if hook else []
    return Runner.from_cfg(cfg)


def trained_state(runner: Runner) -> tuple[dict, dict, list]:
    """Weights (buffers included), optimizer state and RNG states after ``runner.train()``."""
    runner.train()
    model = {k: v.clone() for k, v in runner.model.state_dict().items()}
    rng = [torch.get_rng_state(), np.random.get_state()[1], random.getstate()]
    return model, runner.optim_wrapper.optimizer.state_dict(), rng


def logged(runner: Runner) -> list[dict]:
    path = Path(runner.log_dir) / 'vis_data' / 'scalars.json'
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(a, b, where=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.mark.slow
def test_training_with_the_hook_ends_with_the_same_weights_and_optimizer(tmp_path):
    hook = dict(type='GradientConfusionHook', interval=2, num_batches=2)
    with_hook = digits_runner(EXPANDNET, tmp_path, 'with', hook)
    weights, optimizer, rng = trained_state(with_hook)
    measured = [r for r in logged(with_hook) if 'gc/training/min_cos' in r]
    assert [r['step'] for r in measured] == [0, 2, 4]  # the start and every 2 iterations
    assert {'gc/compact/eta', 'gc/seconds', 'gc/cost_fraction'} <= set(measured[-1])
    without = digits_runner(EXPANDNET, tmp_path, 'without', None)
    weights_without, optimizer_without, rng_without = trained_state(without)
    assert optimizer['state']  # the optimizer stepped
    assert_same_tensors(weights, weights_without, 'model')  # BN statistics included
    assert_same_tensors(optimizer, optimizer_without, 'optimizer')
    assert torch.equal(rng[0], rng_without[0]) and np.array_equal(rng[1], rng_without[1])
    assert rng[2] == rng_without[2]


@pytest.mark.slow
def test_logged_statistics_are_the_analysis_functions_on_the_hooks_batches(tmp_path):
    runner = digits_runner(EXPANDNET, tmp_path, 'stats',
                           dict(type='GradientConfusionHook', interval=2, num_batches=3),
                           max_iters=2)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, GradientConfusionHook))
    assert len(hook.batches) == 3
    last = [r for r in logged(runner) if 'gc/training/min_cos' in r][-1]
    model = deployable_model(runner.model)
    for space in ('training', 'compact'):
        summary = gradient_confusion(model, hook.batches, mm_loss_fn(preprocess=False),
                                     space=space).summary()
        for stat in ('min_cos', 'mean_cos', 'frac_negative', 'eta'):
            assert last[f'gc/{space}/{stat}'] == pytest.approx(summary[stat], rel=1e-6,
                                                               abs=1e-9), (space, stat)


@pytest.mark.slow
def test_a_compact_model_is_measured_in_the_training_space_only(tmp_path):
    runner = digits_runner(COMPACT, tmp_path, 'compact',
                           dict(type='GradientConfusionHook', interval=1, num_batches=2,
                                measure_at_start=False), max_iters=1)
    runner.train()
    keys = set().union(*[r for r in logged(runner) if 'gc/seconds' in r])
    assert 'gc/training/mean_cos' in keys and not any(k.startswith('gc/compact') for k in keys)


@pytest.mark.parametrize('kwargs', [dict(interval=0), dict(num_batches=1),
                                    dict(num_batches=2.5), dict(bn='batch')])
def test_bad_settings_are_refused_naming_the_setting(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        GradientConfusionHook(**kwargs)


def test_rng_and_grads_come_back():
    from expand_mm.hooks.gradient_confusion import preserved_grads, preserved_rng_states
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    with preserved_grads(model):
        model.weight.grad.zero_()
        model.bias.grad = torch.ones(2)
    assert torch.equal(model.weight.grad, torch.ones(2, 3))
    assert model.bias.grad is None
    torch.manual_seed(1)
    np.random.seed(1)
    expected = (torch.rand(1), np.random.rand())
    torch.manual_seed(1)
    np.random.seed(1)
    with preserved_rng_states():
        torch.rand(3), np.random.rand(3)
    assert torch.equal(torch.rand(1), expected[0]) and np.random.rand() == expected[1]
