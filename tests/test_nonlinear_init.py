"""NonlinearInitHook: train with a nonlinearity between the sub-layers, then linear."""
import os
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner
from torch import nn

import expand_mm
from data_factory import make_voc
from expand_mm.hooks import NONLINEAR_INIT_META_KEY, NonlinearInitHook
from mm_test_utils import shrink_for_test

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'expandnet', 'expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py')


class TinyNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def expanded_net(mode='online'):
    torch.manual_seed(0)
    net = TinyNet()
    expand_mm.expand_model(net, strategy='cl', ratio=2, mode=mode)
    return net


def fake_runner(model, it=0, epoch=0, max_iters=10, max_epochs=None):
    return SimpleNamespace(model=model, iter=it, epoch=epoch, max_iters=max_iters,
                           max_epochs=max_epochs, logger=MMLogger.get_current_instance())


def nonlinear(model):
    return [layer.nonlinearity is not None for _, layer in expand_mm.expanded_layers(model)]


def test_switches_to_nonlinear_and_back_at_end():
    net = expanded_net()
    x = torch.randn(1, 3, 5, 5)
    linear_out = net(x)
    hook = NonlinearInitHook(act_cfg=dict(type='ReLU'), end=2)
    runner = fake_runner(net)
    hook.before_train(runner)
    layers = [layer for _, layer in expand_mm.expanded_layers(net)]
    assert all(l.mode == 'explicit' for l in layers) and all(nonlinear(net))
    assert layers[0].nonlinearity is not layers[1].nonlinearity  # one module each
    assert not torch.allclose(net(x), linear_out)  # same parameters, another function
    checkpoint = {'meta': {}}
    hook.before_save_checkpoint(runner, checkpoint)
    assert checkpoint['meta'][NONLINEAR_INIT_META_KEY]['end'] == 2
    hook.after_train_iter(runner, 0)  # one iteration done: still nonlinear
    assert all(nonlinear(net))
    runner.iter = 1
    hook.after_train_iter(runner, 1)  # two done: linear, modes restored
    assert not any(nonlinear(net)) and all(l.mode == 'online' for l in layers)
    torch.testing.assert_close(net(x), linear_out)
    checkpoint = {'meta': {}}
    hook.before_save_checkpoint(runner, checkpoint)
    assert NONLINEAR_INIT_META_KEY not in checkpoint['meta']
    expand_mm.contract_model(net)  # linear again: contracts


def test_resume_before_and_after_end_and_explicit_mode_kept():
    net = expanded_net(mode='explicit')
    NonlinearInitHook(end=3).before_train(fake_runner(net, it=3))
    assert not any(nonlinear(net))  # resumed at end: linear
    hook = NonlinearInitHook(end=3)
    hook.before_train(fake_runner(net, it=2))
    assert all(nonlinear(net))  # resumed before end: nonlinear
    hook.after_train_iter(fake_runner(net, it=2), 0)
    assert not any(nonlinear(net))
    assert all(l.mode == 'explicit' for _, l in expand_mm.expanded_layers(net))


def test_by_epoch_counts_epochs():
    net = expanded_net()
    hook = NonlinearInitHook(act_cfg=dict(type='LeakyReLU', negative_slope=0.1), end=1,
                             by_epoch=True)
    runner = fake_runner(net, max_epochs=3)
    hook.before_train(runner)
    assert all(isinstance(l.nonlinearity, nn.LeakyReLU)
               for _, l in expand_mm.expanded_layers(net))
    hook.after_train_iter(runner, 0)  # iterations do not count
    assert all(nonlinear(net))
    hook.after_train_epoch(runner)
    assert not any(nonlinear(net))


@pytest.mark.parametrize('end', [0, -1, 1.5, True, None])
def test_bad_end_is_named(end):
    with pytest.raises(ValueError, match=r'NonlinearInitHook: end=.* must be a positive int'):
        NonlinearInitHook(end=end)


def test_an_end_the_run_never_reaches_is_refused_before_training():
    """Otherwise the whole run trains nonlinear and no checkpoint has a compact form."""
    from mmengine.runner import IterBasedTrainLoop
    with pytest.raises(ValueError, match=r'end=10 >= the 10 iterations of training.*below 10'):
        NonlinearInitHook(end=10).before_train(fake_runner(expanded_net(), max_iters=10))
    runner = fake_runner(expanded_net(), max_epochs=1)
    runner.train_loop = object.__new__(IterBasedTrainLoop)  # after_train_epoch never runs
    with pytest.raises(ValueError, match=r'by_epoch=True, but the training loop counts '
                                         r'iterations'):
        NonlinearInitHook(end=1, by_epoch=True).before_train(runner)
    assert not any(nonlinear(runner.model))  # refused before anything changed


def test_bad_activation_and_model_without_expanded_layers():
    with pytest.raises(ValueError, match="act_cfg type 'NoSuchAct' is not a registered"):
        NonlinearInitHook(act_cfg=dict(type='NoSuchAct'), end=1)
    with pytest.raises(ValueError, match='has parameters'):
        NonlinearInitHook(act_cfg=dict(type='PReLU'), end=1)
    with pytest.raises(ValueError, match='NonlinearInitHook: the model has no expanded layer'):
        NonlinearInitHook(end=1).before_train(fake_runner(TinyNet()))


class RecordingLogger:

    def __init__(self):
        self.records = []

    def info(self, msg):
        self.records.append(('info', msg))

    def warning(self, msg):
        self.records.append(('warning', msg))


def test_contract_hook_skips_marked_checkpoints_once_and_forgets_removed_ones(tmp_path):
    from expand_mm.hooks import ContractCheckpointHook
    hook = ContractCheckpointHook()
    logger = RecordingLogger()
    info = {}
    runner = SimpleNamespace(message_hub=SimpleNamespace(runtime_info=info), logger=logger,
                             hooks=[])
    marked = {'state_dict': {'w': torch.zeros(1)},
              'meta': {NONLINEAR_INIT_META_KEY: dict(end=3)}}
    paths = [str(tmp_path / f'iter_{i}.pth') for i in (1, 2)]
    for path in paths:
        info['last_ckpt'] = path  # CheckpointHook names the file, then saves it
        hook.before_save_checkpoint(runner, marked)
        torch.save(marked, path)
        hook.before_save_checkpoint(runner, marked)  # same name again: a re-save, not new
    assert [level for level, _ in logger.records] == ['warning', 'info']
    assert all('nonlinear phase' in msg for _, msg in logger.records)
    assert not any(f.endswith('_compact.pth') for f in os.listdir(tmp_path))
    os.remove(paths[0])  # CheckpointHook's max_keep_ckpts: the skipped entry goes too
    info['last_ckpt'] = str(tmp_path / 'iter_3.pth')
    hook.before_save_checkpoint(runner, marked)
    assert paths[0] not in hook._twins and hook._twins[paths[1]] is None


# ------------------------------------------------------------ real Runner runs
class ProbeHook(Hook):
    """Records, before every train iteration, whether the model is nonlinear."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append(any(nonlinear(runner.model)))


def tiny_cfg(tmp_path, max_iters, end):
    data_root = str(tmp_path / 'data')
    if not osp.isdir(data_root):
        make_voc(data_root, num_images=3, size=96)
    cfg = Config.fromfile(CONFIG)
    shrink_for_test(cfg, str(tmp_path / 'work'), data_root + '/', (96, 96), max_iters)
    cfg.default_hooks.checkpoint.interval = 1
    cfg.custom_hooks = [*cfg.get('custom_hooks', []), dict(type='NonlinearInitHook', end=end)]
    return cfg


def run(cfg):
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook()
    runner.register_hook(probe)
    runner.train()
    return runner, probe.seen


@pytest.mark.slow
def test_runner_skips_nonlinear_checkpoints_and_contracts_after_switch_and_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path, max_iters=3, end=2)
    runner, seen = run(cfg)
    work = cfg.work_dir
    assert seen == [True, True, False]
    assert not any(nonlinear(runner.model))
    files = sorted(f for f in os.listdir(work) if f.endswith('.pth'))
    assert files == ['iter_1.pth', 'iter_2.pth', 'iter_2_compact.pth', 'iter_3.pth',
                     'iter_3_compact.pth']
    assert torch.load(osp.join(work, 'iter_1.pth'))['meta'][NONLINEAR_INIT_META_KEY]
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        skipped = [line for line in f if 'saved during the nonlinear phase' in line]
    assert len(skipped) == 1 and 'WARNING' in skipped[0] and 'iter_1.pth' in skipped[0]
    assert NONLINEAR_INIT_META_KEY not in torch.load(osp.join(work, 'iter_2.pth'))['meta']

    compact_cfg = tiny_cfg(tmp_path, max_iters=3, end=2)
    compact_cfg.model = expand_mm.models.compact_model_cfg(compact_cfg.model)
    with DefaultScope.overwrite_default_scope(compact_cfg.default_scope):
        stock = MODELS.build(compact_cfg.model)
    stock.load_state_dict(torch.load(osp.join(work, 'iter_3_compact.pth'))['state_dict'],
                          strict=True)

    # Resume before end: nonlinear for the one remaining nonlinear iteration.
    cfg = tiny_cfg(tmp_path, max_iters=3, end=2)
    cfg.work_dir = str(tmp_path / 'resume1')
    cfg.resume, cfg.load_from = True, osp.join(work, 'iter_1.pth')
    runner, seen = run(cfg)
    assert seen == [True, False] and runner.iter == 3
    assert osp.isfile(osp.join(cfg.work_dir, 'iter_3_compact.pth'))
    # Resume at end: linear from the start.
    cfg = tiny_cfg(tmp_path, max_iters=3, end=2)
    cfg.work_dir = str(tmp_path / 'resume2')
    cfg.resume, cfg.load_from = True, osp.join(work, 'iter_2.pth')
    _, seen = run(cfg)
    assert seen == [False]


def test_contraction_refuses_a_nonlinear_phase_checkpoint(tmp_path):
    from expand_mm.checkpoint import CheckpointError
    from expand_mm.deploy import write_compact_checkpoint
    net = expanded_net()
    marked, plain = str(tmp_path / 'nonlinear.pth'), str(tmp_path / 'linear.pth')
    torch.save({'meta': {NONLINEAR_INIT_META_KEY: dict(end=2)}, 'state_dict': net.state_dict()},
               marked)
    torch.save({'meta': {}, 'state_dict': net.state_dict()}, plain)
    with pytest.raises(CheckpointError, match='nonlinear phase of NonlinearInitHook'):
        write_compact_checkpoint(net, marked, probe_shape=(1, 3, 8, 8))
    assert not osp.exists(tmp_path / 'nonlinear_compact.pth')
    dst, errors = write_compact_checkpoint(net, plain, probe_shape=(1, 3, 8, 8))
    assert osp.isfile(dst) and errors['max_rel'] < 1e-5


NLINIT_DIGITS = osp.join(ROOT, 'projects', 'digits', 'configs', 'digits',
                         'expandnet-cl-r4-nlinit_yolo-lite_1xb16-900i_digits-det-64x64.py')


@pytest.mark.slow
def test_config_file_checkpoint_of_the_nonlinear_phase_reads_back_and_resumes(tmp_path):
    """The nlinit config as a file: its act_cfg is an mmengine ConfigDict, which must not
    reach the checkpoint's meta (torch >= 2.6 loads with weights_only=True and refuses it:
    the Runner crashed at the first nonlinear-phase checkpoint, and nothing could read it)."""
    import subprocess
    import sys
    from wrapper_test_utils import make_digits, tiny_cfg as digits_cfg

    data = make_digits(tmp_path / 'digits')

    def nlinit_cfg(work):
        cfg = digits_cfg(NLINIT_DIGITS, data, tmp_path / work, 'det', max_iters=3)
        cfg.default_hooks.checkpoint.interval = 1
        hook = next(h for h in cfg.custom_hooks if h['type'] == 'NonlinearInitHook')
        hook['end'] = 2
        assert type(hook['act_cfg']).__name__ == 'ConfigDict'  # what the bug needs
        return cfg

    cfg = nlinit_cfg('work')
    runner, seen = run(cfg)
    work = cfg.work_dir
    assert seen == [True, True, False]
    marked = osp.join(work, 'iter_1.pth')
    meta = torch.load(marked, weights_only=True)['meta'][NONLINEAR_INIT_META_KEY]
    assert meta == dict(act_cfg=dict(type='ReLU'), end=2, by_epoch=False)
    assert type(meta['act_cfg']) is dict
    # ContractCheckpointHook skipped it and contracted the linear ones.
    assert not osp.exists(osp.join(work, 'iter_1_compact.pth'))
    assert osp.isfile(osp.join(work, 'iter_2_compact.pth'))
    # tools/contract.py reads it and refuses it by name.
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'contract.py'),
                             NLINIT_DIGITS, marked, str(tmp_path / 'out.pth'),
                             '--img-size', '64', '64'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'iter_1.pth was saved during the nonlinear phase' in result.stderr
    # --resume from it: nonlinear for the one iteration left before end, then linear.
    cfg = nlinit_cfg('resumed')
    cfg.resume, cfg.load_from = True, marked
    runner, seen = run(cfg)
    assert seen == [True, False] and runner.iter == 3
    assert osp.isfile(osp.join(cfg.work_dir, 'iter_3_compact.pth'))


def test_a_class_activation_of_a_python_config_is_written_by_name(tmp_path):
    """dict(type=nn.LeakyReLU) (pure-Python configs) in the nonlinear-phase meta would make
    the checkpoint unreadable under weights_only loading: it is written as its name."""
    from expand_mm.checkpoint import read_checkpoint
    hook = NonlinearInitHook(act_cfg=dict(type=torch.nn.LeakyReLU, negative_slope=0.1), end=10)
    hook._modes = {1: 1}
    checkpoint = {'state_dict': {'w': torch.zeros(1)}}
    hook.before_save_checkpoint(None, checkpoint)
    torch.save(checkpoint, tmp_path / 'iter_1.pth')
    meta = read_checkpoint(str(tmp_path / 'iter_1.pth'))['meta']
    assert meta['expand_mm_nonlinear_init']['act_cfg'] == {
        'type': 'torch.nn.modules.activation.LeakyReLU', 'negative_slope': 0.1}
