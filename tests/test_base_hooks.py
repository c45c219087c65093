"""An ExpandNet config keeps every hook of the stock config it inherits.

MMEngine merges dicts but replaces lists: expand_mm's hooks sit under keys of
``default_hooks``, so the stock ``custom_hooks`` (YOLOX's mode switch, norm
sync and EMA) stay, in the shipped configs and in the README's recipe; a
config whose own ``custom_hooks`` list drops them is warned about.
"""
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import EMAHook
from mmengine.runner import Runner

import expand_mm
from data_factory import make_coco, make_voc
from expand_mm.checks import dropped_base_hooks_warning
from expand_mm.hooks import ContractCheckpointHook, ExpandCheckpointLoadHook, ExpandNetCheckHook
from mm_test_utils import shrink_for_test
from wrapper_test_utils import ROOT

YOLOX = ROOT / 'configs/yolox/yolox_tiny_8xb8-300e_coco.py'
YOLOX_EXPANDNET = ROOT / 'configs/expandnet/expandnet-cl-r4_yolox-tiny_8xb8-300e_coco.py'
YOLO_LITE_EXPANDNET = ROOT / 'configs/expandnet/expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py'
OURS = ['ExpandCheckpointLoadHook', 'ContractCheckpointHook', 'ExpandNetCheckHook', 'RNGStateHook']
# expand_mm's CheckpointHook subclass takes the stock checkpoint hook's place (same key).
STANDS_FOR = {'SafeCheckpointHook': 'CheckpointHook'}


def recipe(doc: str) -> str:
    """The ExpandNet recipe of a doc page: its first Python block with type='ExpandNet'."""
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / doc).read_text(), flags=re.S)
    return next(b for b in blocks if "type='ExpandNet'" in b and '_base_' in b)


def yolox_runner(config, tmp_path, max_iters=1) -> Runner:
    data_root = str(tmp_path / 'data')
    if not osp.isdir(data_root):
        for split in ('train2017', 'val2017'):
            make_coco(data_root, num_images=2, size=64, split=split,
                      class_names=('person', 'bicycle'))
    cfg = Config.fromfile(str(config))
    shrink_for_test(cfg, str(tmp_path / 'work'), data_root + '/', (64, 64), max_iters)
    cfg.default_hooks.checkpoint.interval = 1
    return Runner.from_cfg(cfg)


def hook_list(runner) -> list[tuple[str, int]]:
    return [(type(h).__name__, h.priority) for h in runner.hooks]


@pytest.mark.slow
def test_yolox_expandnet_runs_every_stock_hook_and_expand_mms(tmp_path):
    stock = hook_list(yolox_runner(YOLOX, tmp_path))
    assert {'YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook'} <= {name for name, _ in stock}
    # the README's recipe on the same stock config, and the shipped ExpandNet config (built
    # last: the runner trained below must be the current one of mmengine's message hub)
    user = tmp_path / 'expandnet_yolox.py'
    user.write_text(re.sub(r"_base_ = '[^']*'", f'_base_ = {str(YOLOX)!r}', recipe('README.md')))
    guide = tmp_path / 'expandnet_yolox_guide.py'
    guide.write_text(re.sub(r"_base_ = '[^']*'", f'_base_ = {str(YOLOX)!r}',
                            recipe('docs/user_guide.md')))
    for key in ('default_hooks', 'custom_hooks'):  # the user guide's recipe: the same hooks
        assert Config.fromfile(str(guide)).get(key) == Config.fromfile(str(user)).get(key)
    # the recipe's checkpoint hook (the test runners below save with the stock one)
    assert Config.fromfile(str(user)).default_hooks.checkpoint.type == 'SafeCheckpointHook'
    runners = {'README recipe': yolox_runner(user, tmp_path)}
    runners['shipped'] = yolox_runner(YOLOX_EXPANDNET, tmp_path)
    for name, runner in runners.items():
        hooks = hook_list(runner)
        stock_view = [(STANDS_FOR.get(h, h), p) for h, p in hooks if h not in OURS]
        assert stock_view == stock, name  # same hooks, same order
        assert sorted(h for h, _ in hooks if h in OURS) == sorted(OURS), name
        ema = next(h for h in runner.hooks if isinstance(h, EMAHook))
        assert (ema.ema_cfg['type'], ema.ema_cfg['momentum']) == ('ExpMomentumEMA', 0.0001)

    runner = runners['shipped']
    runner.train()  # one iteration: the EMA steps, and the compact twin is the EMA model's
    ema = next(h for h in runner.hooks if isinstance(h, EMAHook))
    assert int(ema.ema_model.steps) == 1
    compact = torch.load(osp.join(runner.work_dir, 'iter_1_compact.pth'))['state_dict']
    expected = expand_mm.contract_model(ema.ema_model.module).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(compact[key], value)


def test_a_custom_hooks_list_that_drops_the_bases_hooks_is_named(tmp_path):
    user = tmp_path / 'expandnet_yolox.py'
    user.write_text(f'''_base_ = {str(YOLOX)!r}
custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)
model = dict(_delete_=True, type='ExpandNet', model={{{{_base_.model}}}})
custom_hooks = [dict(type='ExpandCheckpointLoadHook'), dict(type='ContractCheckpointHook'),
                dict(type='ExpandNetCheckHook')]
''')
    cfg = Config.fromfile(str(user))
    hooks = [ExpandCheckpointLoadHook(), ContractCheckpointHook(), ExpandNetCheckHook()]
    warning = dropped_base_hooks_warning(cfg, hooks)
    assert warning.startswith(f"the base config's custom hooks YOLOXModeSwitchHook, "
                              f'SyncNormHook, EMAHook of {str(YOLOX)} do not run: custom_hooks '
                              f'in {user} replaces the base\'s list')
    from mmdet.engine.hooks import SyncNormHook, YOLOXModeSwitchHook
    stock = [YOLOXModeSwitchHook(), SyncNormHook(), EMAHook()]
    assert dropped_base_hooks_warning(cfg, hooks + stock) is None
    assert dropped_base_hooks_warning(Config(cfg.to_dict()), hooks) is None  # no file: no check


@pytest.mark.slow
def test_the_check_hook_warns_when_a_config_drops_its_bases_hooks(tmp_path):
    """End to end on the small YOLO-LITE ExpandNet: a base with an EMAHook, a config that
    lists its own custom_hooks; the warning is in the training log, and not for the base."""
    base = tmp_path / 'with_ema.py'
    base.write_text(f'_base_ = {str(YOLO_LITE_EXPANDNET)!r}\n'
                    "custom_hooks = [dict(type='EMAHook', momentum=0.5)]\n")
    child = tmp_path / 'child.py'
    child.write_text("_base_ = './with_ema.py'\n"
                     "custom_hooks = [dict(type='CheckInvalidLossHook', interval=1)]\n")
    data_root = str(tmp_path / 'data')
    make_voc(data_root, num_images=3, size=96)
    logs = {}
    for config in (base, child):
        cfg = Config.fromfile(str(config))  # its filename: where the check reads the bases
        shrink_for_test(cfg, str(tmp_path / config.stem), data_root + '/', (96, 96), 1)
        runner = Runner.from_cfg(cfg)
        runner.train()
        logs[config.stem] = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    warning = ("ExpandNetCheckHook: the base config's custom hooks EMAHook of ./with_ema.py "
               f'do not run: custom_hooks in {child} replaces')
    assert warning in logs['child']
    assert "the base config's custom hooks" not in logs['with_ema']


def test_options_of_expand_mms_hooks_are_set_by_key(tmp_path):
    """--cfg-options default_hooks.expand_contract.verify=False reaches the registered hook
    (merged into its dict: its type and other options stay)."""
    from test_checkpoint_hooks import tiny_cfg
    cfg = tiny_cfg(tmp_path)
    cfg.merge_from_dict({'default_hooks.expand_contract.verify': False,
                         'default_hooks.expand_load.strict': False})
    runner = Runner.from_cfg(cfg)
    contract = next(h for h in runner.hooks if isinstance(h, ContractCheckpointHook))
    load = next(h for h in runner.hooks if isinstance(h, ExpandCheckpointLoadHook))
    assert (contract.verify, contract.suffix, load.strict) == (False, '_compact', False)
    assert sum(isinstance(h, ExpandNetCheckHook) for h in runner.hooks) == 1
