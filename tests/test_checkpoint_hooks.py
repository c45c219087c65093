"""The checkpoint hooks inside real Runner runs: EMA, load_from compact, bad files."""
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.fileio.backends import BaseStorageBackend
from mmengine.runner import Runner

import expand_mm
from data_factory import make_voc
from mm_test_utils import shrink_for_test

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'expandnet', 'expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py')


def tiny_cfg(tmp_path, max_iters=2):
    data_root = str(tmp_path / 'data')
    if not osp.isdir(data_root):
        make_voc(data_root, num_images=3, size=96)
    cfg = Config.fromfile(CONFIG)
    shrink_for_test(cfg, str(tmp_path / 'work'), data_root + '/', (96, 96), max_iters)
    return cfg


def assert_state_dicts_close(a, b, rtol=1e-5):
    assert set(a) == set(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=rtol,
                                       atol=rtol * float(a[key].abs().max() + 1e-12))
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_compact_checkpoint_is_the_contracted_ema_model(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.custom_hooks = [*cfg.get('custom_hooks', []), dict(type='EMAHook', momentum=0.5)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
    compact = torch.load(osp.join(cfg.work_dir, 'iter_2_compact.pth'))['state_dict']
    ema = expand_mm.contract_model(ema_hook.ema_model.module).state_dict()
    raw = expand_mm.contract_model(runner.model).state_dict()
    assert_state_dicts_close(compact, ema)
    differs = [k for k in raw if raw[k].is_floating_point() and
               not torch.allclose(raw[k], ema[k], rtol=1e-3, atol=1e-6)]
    assert differs, 'EMA and raw weights coincide: the test would not tell them apart'


@pytest.mark.slow
def test_load_from_compact_checkpoint_keeps_its_function(tmp_path):
    cfg = tiny_cfg(tmp_path)
    Runner.from_cfg(cfg).train()
    compact_path = osp.join(cfg.work_dir, 'iter_2_compact.pth')
    compact = torch.load(compact_path)['state_dict']

    cfg = tiny_cfg(tmp_path)
    cfg.work_dir = str(tmp_path / 'work2')
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(compact_path)  # what load_from= does, hooks included
    assert_state_dicts_close(expand_mm.contract_model(runner.model).state_dict(), compact,
                             rtol=1e-4)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(8, 3, 3, 3)},
                'meta': {}}, other)
    cfg = tiny_cfg(tmp_path)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(expand_mm.CheckpointError) as err:
        runner.load_checkpoint(str(other))
    message = str(err.value)
    assert 'fits neither' in message and 'backbone.conv1.weight' in message
    assert message.endswith('load it non-strictly: --cfg-options default_hooks.expand_load.'
                            "strict=False (the config's dict(type='ExpandCheckpointLoadHook', "
                            'strict=False))')  # the fine-tuning way out


@pytest.mark.slow
def test_corrupt_load_from_fails_before_training(tmp_path):
    corrupt = tmp_path / 'corrupt.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    cfg = tiny_cfg(tmp_path)
    cfg.load_from = str(corrupt)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(expand_mm.CheckpointError, match='corrupt or truncated'):
        runner.train()
    assert not osp.exists(osp.join(cfg.work_dir, 'iter_1.pth'))


@pytest.mark.slow
def test_compact_twins_follow_max_keep_ckpts(tmp_path):
    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False,
                                        max_keep_ckpts=1)
    Runner.from_cfg(cfg).train()
    kept = sorted(f for f in os.listdir(cfg.work_dir) if f.endswith(".pth"))
    assert kept == ['iter_3.pth', 'iter_3_compact.pth']


@pytest.mark.slow
def test_compact_twins_follow_max_keep_ckpts_by_epoch(tmp_path):
    # 3 iterations per epoch: epoch_1.pth holds iter 3, a step number that the kept
    # epochs [2, 3] contain; the twin goes by the hook's file names, not by numbers.
    cfg = tiny_cfg(tmp_path, max_iters=2)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=3, val_interval=100)
    cfg.log_processor = dict(by_epoch=True)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=True,
                                        max_keep_ckpts=2)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 9
    kept = sorted(f for f in os.listdir(cfg.work_dir) if f.endswith('.pth'))
    assert kept == ['epoch_2.pth', 'epoch_2_compact.pth', 'epoch_3.pth', 'epoch_3_compact.pth']
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert 'is gone, but not by CheckpointHook' not in log


@pytest.mark.slow
def test_a_checkpoint_moved_by_hand_keeps_its_compact_twin(tmp_path):
    from mmengine.hooks import Hook

    class MoveFirstCheckpoint(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == 2:  # iter_1.pth and its twin exist by now
                os.replace(osp.join(runner.work_dir, 'iter_1.pth'), tmp_path / 'kept.pth')

    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(MoveFirstCheckpoint())
    runner.train()
    kept = sorted(f for f in os.listdir(cfg.work_dir) if f.endswith(".pth"))
    assert kept == ['iter_1_compact.pth', 'iter_2.pth', 'iter_2_compact.pth', 'iter_3.pth',
                    'iter_3_compact.pth']
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert 'iter_1.pth is gone, but not by CheckpointHook; its compact copy' in log


@pytest.mark.parametrize('kwargs, message', [
    (dict(suffix=''), r"suffix='' must be a non-empty string"),
    (dict(probe_shape=(3, 64, 64)), r'probe_shape=\(3, 64, 64\) must be an NCHW shape'),
])
def test_contract_hook_arguments_are_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        expand_mm.hooks.ContractCheckpointHook(**kwargs)


class MemoryBackend(BaseStorageBackend):
    """A non-local MMEngine file backend (``memtest://``) holding files in a dict."""

    files: dict = {}

    def __init__(self, **kwargs):
        pass

    def get(self, filepath):
        return self.files[str(filepath)]

    def get_text(self, filepath, encoding='utf-8'):
        return self.get(filepath).decode(encoding)

    def put(self, obj, filepath):
        self.files[str(filepath)] = bytes(obj)

    def put_text(self, obj, filepath, encoding='utf-8'):
        self.put(obj.encode(encoding), filepath)

    def exists(self, filepath):
        return self.isfile(filepath) or self.isdir(filepath)

    def isfile(self, filepath):
        return str(filepath) in self.files

    def isdir(self, filepath):
        return any(k.startswith(str(filepath).rstrip('/') + '/') for k in self.files)

    def remove(self, filepath):
        del self.files[str(filepath)]

    def join_path(self, filepath, *filepaths):
        return '/'.join([str(filepath).rstrip('/'), *filepaths])


@pytest.mark.slow
def test_compact_checkpoint_goes_through_a_remote_file_backend_without_reading_back(
        tmp_path, monkeypatch):
    """CheckpointHook writes to a non-local backend: the compact twin goes there too, made
    from the model in memory (nothing is read back: torch.load fails during training), and
    max_keep_ckpts retires the twins there as well."""
    import io

    from mmengine.fileio import FileClient, register_backend
    register_backend('memtest', MemoryBackend, force=True, prefixes='memtest')
    # CheckpointHook also asks the deprecated FileClient for the prefix.
    FileClient.register_backend('memtest', MemoryBackend, force=True, prefixes='memtest')
    MemoryBackend.files.clear()
    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False,
                                        max_keep_ckpts=2, out_dir='memtest://bucket')

    def no_read_back(*args, **kwargs):
        raise AssertionError('a checkpoint was read back during training')

    runner = Runner.from_cfg(cfg)
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'load', no_read_back)
        runner.train()
    names = sorted(k.rsplit('/', 1)[-1] for k in MemoryBackend.files)
    assert names == ['iter_2.pth', 'iter_2_compact.pth', 'iter_3.pth', 'iter_3_compact.pth']
    assert not any(f.endswith('.pth') for f in os.listdir(cfg.work_dir))
    key = next(k for k in MemoryBackend.files if k.endswith('iter_3_compact.pth'))
    compact = torch.load(io.BytesIO(MemoryBackend.files[key]))
    assert compact['meta']['expand_mm']['source'] == key.replace('_compact', '')
    assert_state_dicts_close(compact['state_dict'],
                             expand_mm.contract_model(runner.model).state_dict())
