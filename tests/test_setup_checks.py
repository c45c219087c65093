"""The start-of-training checks fire the same whatever starts the run.

Most users train with mmdet's / mmseg's own ``tools/train.py``, i.e.
``Runner.from_cfg(cfg).train()``: the checks live in ``ExpandNetCheckHook``,
which the ExpandNet configs carry, so that path refuses and warns exactly as
this repository's ``tools/train.py`` does.
"""
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.runner import Runner

import expand_mm
from test_checkpoint_hooks import ROOT, tiny_cfg

pytestmark = pytest.mark.slow


def _run_train_tool(cfg, tmp_path):
    path = str(tmp_path / 'dumped.py')
    cfg.dump(path)
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), path],
                          capture_output=True, text=True, cwd=tmp_path)


def test_a_refusal_is_the_same_under_runner_from_cfg_and_tools_train(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.optim_wrapper.pop('constructor')
    cfg.optim_wrapper.paramwise_cfg = dict(factor_lr_mult=0.5)
    with pytest.raises(expand_mm.ConfigError, match=r"sets \['factor_lr_mult'\], which only "
                                                    r"constructor=") as caught:
        Runner.from_cfg(cfg).train()
    assert not osp.exists(osp.join(cfg.work_dir, 'iter_2.pth'))  # refused before training
    result = _run_train_tool(cfg, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f'error: {caught.value}'


def test_a_warning_is_the_same_under_runner_from_cfg_and_tools_train(tmp_path):
    cfg = tiny_cfg(tmp_path, max_iters=1)
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3))
    cfg.default_hooks.pop('expand_contract')
    expected = ['ExpandNetCheckHook: 15 expanded layers train with AdamW at the base rate',
                'ExpandNetCheckHook: no ContractCheckpointHook among the hooks']
    runner = Runner.from_cfg(cfg)
    runner.train()
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert all(line in log for line in expected), log[-3000:]
    cfg.work_dir = str(tmp_path / 'tool')
    result = _run_train_tool(cfg, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(line in result.stdout + result.stderr for line in expected)


def test_train_tool_adds_the_check_hook_to_a_config_without_it(tmp_path):
    """A compact config carries no ExpandNetCheckHook: tools/train.py adds it, so a
    load_from that would load nothing is refused there too."""
    import torch
    cfg = tiny_cfg(tmp_path)
    cfg.model = cfg.model.model  # the compact model of the ExpandNet config
    for key in ('expand_load', 'expand_contract', 'expand_check'):
        cfg.default_hooks.pop(key)
    cfg.optim_wrapper.pop('constructor')
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'decode_head.conv_seg.weight': torch.zeros(2, 4, 1, 1)}}, other)
    cfg.load_from = str(other)
    result = _run_train_tool(cfg, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "other.pth' has none of the" in result.stderr.strip().splitlines()[-1]
