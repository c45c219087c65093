"""Safety under faults and bad input: non-finite weights, unsafe checkpoint files, and
mistakes in a config, each refused in one line that names the problem."""
import math
import os
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

import expand_mm
from expand_mm.errors import NonFiniteError
from test_checkpoint_hooks import tiny_cfg


class PoisonHeadFactor(Hook):
    """Puts a NaN into the first factor of the first expanded head conv after ``at_iter``."""

    def __init__(self, at_iter: int) -> None:
        self.at_iter = at_iter
        self.key = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at_iter:
            path, layer = next((p, l) for p, l in expand_mm.expanded_layers(runner.model)
                               if p.startswith('bbox_head'))
            name, factor = next(iter(layer.named_parameters()))
            with torch.no_grad():
                factor.view(-1)[0] = math.nan
            self.key = f'{path}.{name}'


@pytest.mark.parametrize('max_keep_ckpts', [-1, 1])
def test_a_diverged_run_stops_at_the_save_naming_tensor_iteration_and_way_back(
        tmp_path, max_keep_ckpts):
    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False,
                                        max_keep_ckpts=max_keep_ckpts)
    runner = Runner.from_cfg(cfg)
    poison = PoisonHeadFactor(at_iter=2)
    runner.register_hook(poison)
    with pytest.raises(NonFiniteError) as err:
        runner.train()
    message = str(err.value)
    assert f'at iteration 2 the model holds NaN or Inf in 1 tensor: {poison.key}.' in message
    assert 'neither' in message and 'iter_2.pth nor its compact copy is written' in message
    first = osp.join(cfg.work_dir, 'iter_1.pth')
    saved = sorted(f for f in os.listdir(cfg.work_dir) if f.endswith('.pth'))
    if max_keep_ckpts == 1:  # mmengine removed iter_1.pth before the save; its twin is kept
        assert saved == ['iter_1_compact.pth']
        assert f"was removed (max_keep_ckpts); its compact copy {first[:-4]}_compact.pth is " \
               'kept' in message
    else:
        assert saved == ['iter_1.pth', 'iter_1_compact.pth']
        assert f'Resume from {first}, the last checkpoint saved before it' in message


def test_the_load_hook_refuses_non_finite_weights_naming_the_keys(tmp_path):
    cfg = tiny_cfg(tmp_path)
    runner = Runner.from_cfg(cfg)
    state = runner.model.state_dict()
    bn = next(k for k in state if k.endswith('running_var'))
    state[bn].view(-1)[0] = math.inf
    path = tmp_path / 'diverged.pth'
    torch.save({'state_dict': state, 'meta': {}}, path)
    with pytest.raises(expand_mm.CheckpointError,
                       match=rf'holds NaN or Inf in 1 weight: {bn}\. It was saved after '
                             'training diverged; use an earlier checkpoint'):
        runner.load_checkpoint(str(path))
