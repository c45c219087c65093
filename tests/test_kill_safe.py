"""Checkpoints survive a kill at any moment of a save, and auto-resume finds a good one.

The fault-injection tests run ``tools/train.py`` in a real process that
SIGKILLs itself at the k-th file operation of the run (or after writing
half of the k-th file), resume it with ``--resume`` and compare the weights
at the end with an uninterrupted run's, bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.fileio import LocalBackend
from mmengine.logging import MessageHub

import expand_mm
from data_factory import make_coco
from mm_test_utils import shrink_for_test

ROOT = Path(__file__).resolve().parents[1]
DIGITS_EXPANDNET = ROOT / ('projects/digits/configs/digits/'
                           'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
DIGIT_NAMES = tuple(str(i) for i in range(10))

# ---- the kill switch, armed inside the training process ----

KILL_AT_ENV = 'EXPAND_MM_TEST_KILL_AT'  # "<k>" or "<k>:torn"; events are counted from 1
EVENT_LOG_ENV = 'EXPAND_MM_TEST_EVENT_LOG'  # a file that gets one line per event


def arm_kill_switch() -> None:
    """SIGKILL this process at the k-th file event (write, rename, removal) of the run.

    With ``:torn`` a write is cut in the middle (half of its bytes on disk)
    before the kill. Every event is logged to ``EVENT_LOG_ENV``'s file.
    """
    spec = os.environ.get(KILL_AT_ENV, '0')
    kill_at, torn = int(spec.split(':')[0]), spec.endswith(':torn')
    log_path = os.environ.get(EVENT_LOG_ENV) or None
    count = [0]

    def event(kind: str, path, data: bytes | None = None) -> None:
        count[0] += 1
        if log_path:
            with open(log_path, 'a') as log:
                log.write(f'{count[0]} {kind} {osp.basename(str(path))}\n')
        if count[0] != kill_at:
            return
        if torn and data is not None:
            with open(path, 'wb') as f:
                f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name: str, kind: str, payload=None) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            path, data = payload(*args) if payload else (args[0], None)
            event(kind, path, data)
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)

    original_save = torch.save

    def saving(obj, target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            buffer = io.BytesIO()
            original_save(obj, buffer)
            event('write', target, buffer.getvalue())
        return original_save(obj, target, *args, **kwargs)
    torch.save = saving
    wrap(LocalBackend, 'put', 'write', lambda self, obj, filepath: (filepath, obj))
    wrap(os, 'replace', 'rename')
    wrap(os, 'remove', 'remove')


# The training processes are forked from one that has imported torch, mmdet and
# expand_mm already (the imports take longer than the tiny training).
_FORK_SERVER = """
import json, os, runpy, sys, traceback
import numpy
import expand_mm, mmdet.datasets, mmdet.models, mmengine.runner, test_kill_safe
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        # A new process would draw a new seed where randomness.seed is unset.
        numpy.random.seed(int.from_bytes(os.urandom(4), 'little'))
        os.environ.update(job['env'])
        out = os.open(job['output'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        test_kill_safe.arm_kill_switch()
        sys.argv = job['argv']
        code = 0
        try:
            runpy.run_path(sys.argv[0], run_name='__main__')
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class TrainingProcesses:
    """Runs ``tools/train.py`` in fresh processes forked from a warm one."""

    def __init__(self, output_dir: Path) -> None:
        self._output_dir = output_dir
        self._count = 0
        env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{ROOT / "tests"}',
                   OMP_NUM_THREADS='1')
        self._server = subprocess.Popen([sys.executable, '-c', _FORK_SERVER], cwd=ROOT,
                                        env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, config: Path, *args: str, kill_at: str = '0',
            event_log: Path | None = None) -> SimpleNamespace:
        """``tools/train.py CONFIG ARGS``: its exit code (``-9`` when killed) and output."""
        self._count += 1
        output = self._output_dir / f'train_{self._count}.out'
        env = {KILL_AT_ENV: kill_at, EVENT_LOG_ENV: str(event_log or '')}
        job = dict(argv=[str(ROOT / 'tools' / 'train.py'), str(config), *args], env=env,
                   output=str(output))
        self._server.stdin.write(json.dumps(job) + '\n')
        self._server.stdin.flush()
        code = int(self._server.stdout.readline())
        return SimpleNamespace(returncode=code, output=output.read_text())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)


@pytest.fixture(scope='module')
def trainer(tmp_path_factory):
    """Training processes for the module's tests."""
    processes = TrainingProcesses(tmp_path_factory.mktemp('train_output'))
    yield processes
    processes.close()


def digits_cfg(tmp_path: Path, max_iters: int, max_keep_ckpts: int = -1,
               interval: int = 1) -> Config:
    """The digits ExpandNet detector on 4 tiny images, saving every ``interval`` iterations."""
    root = tmp_path / 'coco'
    if not root.is_dir():
        make_coco(str(root), num_images=4, size=64, class_names=DIGIT_NAMES)
    cfg = Config.fromfile(str(DIGITS_EXPANDNET))
    shrink_for_test(cfg, str(tmp_path / 'work'), f'{root}/', (64, 64), max_iters)
    cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', interval=interval,
                                        by_epoch=False, max_keep_ckpts=max_keep_ckpts)
    cfg.default_hooks.expand_contract.verify = False  # the twins are written all the same
    return cfg


def dump(cfg: Config, path: Path) -> Path:
    cfg.dump(str(path))
    return path


def weights(path: str | Path) -> dict:
    """What a resumed run must reproduce: the model's and the optimizer's state."""
    checkpoint = torch.load(path, weights_only=True)
    return {'state_dict': checkpoint['state_dict'],
            'optimizer': checkpoint.get('optimizer', {}).get('state', {})}


def differing(a, b, prefix: str = '') -> list[str]:
    """The entries of two nested dicts of tensors that are not bit-identical."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f'{prefix}keys']
        return [d for key in a for d in differing(a[key], b[key], f'{prefix}{key}.')]
    if isinstance(a, torch.Tensor):
        return [] if torch.equal(a, b) else [prefix]
    return [] if a == b else [prefix]


def save_events(log: Path, step: int) -> list[int]:
    """The event numbers of the save at ``step`` (from writing its twin to retiring the old)."""
    lines = [line.split() for line in log.read_text().splitlines()]
    start = next(int(n) for n, kind, name in lines if name == f'iter_{step}_compact.pth.tmp')
    end = next((int(n) for n, kind, name in lines
                if int(n) > start and name == f'iter_{step + 1}_compact.pth.tmp'), None)
    return [int(n) for n, _, _ in lines if int(n) >= start and (end is None or int(n) < end)]


# ---- a kill at every file operation of a save ----

@pytest.mark.slow  # two training processes per kill point
def test_a_kill_at_any_moment_of_a_save_resumes_to_the_same_weights(tmp_path, trainer):
    reference_dir = tmp_path / 'reference'
    config = dump(digits_cfg(tmp_path, max_iters=2, max_keep_ckpts=1), tmp_path / 'cfg.py')
    log = tmp_path / 'events.log'
    done = trainer.run(config, '--work-dir', str(reference_dir), event_log=log)
    assert done.returncode == 0, done.output[-3000:]
    reference = weights(reference_dir / 'iter_2.pth')
    reference_twin = torch.load(reference_dir / 'iter_2_compact.pth', weights_only=True)
    lines = {int(line.split()[0]): line.split()[1] for line in log.read_text().splitlines()}
    # A write is cut in the middle, anything else killed before it happens: the twin
    # written, renamed; the checkpoint written, renamed; last_checkpoint; the old two removed.
    points = [f'{k}:torn' if lines[k] == 'write' else str(k) for k in save_events(log, 2)]
    assert len(points) == 7, log.read_text()
    failures = []
    for point in points:
        work_dir = tmp_path / f'kill_{point.replace(":", "_")}'
        killed = trainer.run(config, '--work-dir', str(work_dir), kill_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.output[-2000:])
        resumed = trainer.run(config, '--work-dir', str(work_dir), '--resume')
        if resumed.returncode != 0:
            failures.append(f'{point}: {resumed.output[-1500:]}')
            continue
        left = sorted(os.listdir(work_dir))
        diff = differing(reference, weights(work_dir / 'iter_2.pth'))
        diff += differing(reference_twin['state_dict'], torch.load(
            work_dir / 'iter_2_compact.pth', weights_only=True)['state_dict'], 'compact.')
        files = [name for name in left if name.endswith(('.pth', '.tmp'))]
        if diff or files != ['iter_2.pth', 'iter_2_compact.pth']:
            failures.append(f'{point}: {len(diff)} differing ({diff[:3]}); files {files}')
    assert not failures, '\n'.join(failures)


def resume_run(tmp_path, trainer, max_keep_ckpts: int = -1) -> tuple[Path, Path]:
    """An uninterrupted 2-iteration run saving at both iterations: (config, work dir)."""
    config = dump(digits_cfg(tmp_path, max_iters=2, max_keep_ckpts=max_keep_ckpts),
                  tmp_path / 'cfg.py')
    done = trainer.run(config, '--work-dir', str(tmp_path / 'reference'))
    assert done.returncode == 0, done.output[-3000:]
    return config, tmp_path / 'reference'


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'missing'])
def test_auto_resume_passes_over_a_bad_newest_checkpoint_with_one_warning(tmp_path, trainer,
                                                                          damage):
    config, reference_dir = resume_run(tmp_path, trainer)
    work_dir = tmp_path / 'damaged'
    shutil.copytree(reference_dir, work_dir)
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
    newest = work_dir / 'iter_2.pth'
    if damage == 'missing':
        newest.unlink()
    else:
        newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])
    resumed = trainer.run(config, '--work-dir', str(work_dir), '--resume')
    assert resumed.returncode == 0, resumed.output[-3000:]
    warnings = [line for line in resumed.output.splitlines() if 'cannot be resumed from' in line]
    assert len(warnings) == 1 and f'resuming from {work_dir / "iter_1.pth"}' in warnings[0]
    assert 'Traceback' not in resumed.output
    assert not differing(weights(reference_dir / 'iter_2.pth'), weights(newest))


@pytest.mark.slow
def test_a_resume_cleans_orphan_twins_and_tmp_files_and_keeps_no_more_than_asked(tmp_path,
                                                                                  trainer):
    config, work_dir = resume_run(tmp_path, trainer, max_keep_ckpts=2)
    leftovers = ['iter_9_compact.pth', 'iter_9.pth.tmp', 'iter_3_compact.pth.tmp',
                 'last_checkpoint.tmp']  # what kills in saves after iteration 2 could leave
    for name in leftovers:
        (work_dir / name).write_bytes(b'partial')
    resumed = trainer.run(config, '--work-dir', str(work_dir), '--resume',
                          '--cfg-options', 'train_cfg.max_iters=4')
    assert resumed.returncode == 0, resumed.output[-3000:]
    files = sorted(name for name in os.listdir(work_dir) if name.endswith(('.pth', '.tmp')))
    assert files == ['iter_3.pth', 'iter_3_compact.pth', 'iter_4.pth', 'iter_4_compact.pth']
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_4.pth')


# ---- the choice of the checkpoint to resume from, without training ----

def fake_runner(work_dir: Path) -> SimpleNamespace:
    warnings = []
    logger = SimpleNamespace(warning=warnings.append, info=lambda message: None)
    return SimpleNamespace(_resume=True, _load_from=None, work_dir=str(work_dir),
                           logger=logger, warnings=warnings)


def write_checkpoint(path: Path, readable: bool = True) -> None:
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'meta': {'iter': 1}}, path)
    if not readable:
        path.write_bytes(path.read_bytes()[:40])


def test_the_newest_readable_checkpoint_is_resumed_when_last_checkpoint_names_a_bad_one(
        tmp_path):
    for step, readable in ((10, True), (20, True), (30, False)):
        write_checkpoint(tmp_path / f'iter_{step}.pth', readable)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_30.pth'))
    runner = fake_runner(tmp_path)
    expand_mm.SafeCheckpointHook(interval=10, by_epoch=False).before_run(runner)
    assert runner._load_from == str(tmp_path / 'iter_20.pth')
    assert len(runner.warnings) == 1 and 'iter_30.pth cannot be resumed from' in \
        runner.warnings[0]


def test_a_readable_last_checkpoint_or_an_explicit_file_is_left_to_mmengine(tmp_path):
    write_checkpoint(tmp_path / 'iter_10.pth')
    write_checkpoint(tmp_path / 'iter_20.pth', readable=False)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_10.pth'))
    runner = fake_runner(tmp_path)
    expand_mm.SafeCheckpointHook(interval=10, by_epoch=False).before_run(runner)
    assert runner._load_from is None and not runner.warnings
    runner._load_from = str(tmp_path / 'iter_20.pth')  # --resume FILE: the user's choice
    expand_mm.SafeCheckpointHook(interval=10, by_epoch=False).before_run(runner)
    assert runner._load_from == str(tmp_path / 'iter_20.pth')


def test_no_readable_checkpoint_to_resume_from_is_one_clear_error(tmp_path):
    write_checkpoint(tmp_path / 'iter_10.pth', readable=False)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_20.pth'))
    with pytest.raises(expand_mm.CheckpointError, match=r'names .*iter_20.pth, which cannot be '
                       r'resumed from .*does not exist.*no other checkpoint'):
        expand_mm.SafeCheckpointHook(interval=10, by_epoch=False).before_run(
            fake_runner(tmp_path))


def test_the_train_tool_selects_the_safe_hooks_keeping_the_checkpoint_settings():
    from wrapper_test_utils import load_tool
    train = load_tool('train')
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=5,
                                                          max_keep_ckpts=2))))
    train.add_resume_hooks(cfg)
    assert cfg.default_hooks.checkpoint == dict(type='SafeCheckpointHook', interval=5,
                                                max_keep_ckpts=2)
    assert cfg.default_hooks.rng_state == dict(type='RNGStateHook')
    bare = Config(dict())
    train.add_resume_hooks(bare)  # the Runner's default CheckpointHook saves every epoch
    assert bare.default_hooks.checkpoint == dict(type='SafeCheckpointHook', interval=1)
    custom = Config(dict(default_hooks=dict(checkpoint=None),
                         custom_hooks=[dict(type='RNGStateHook')]))
    train.add_resume_hooks(custom)
    assert custom.default_hooks == dict(checkpoint=None)  # saving turned off: left so
    off = Config(dict(default_hooks=dict(rng_state=None)))  # turned off, as the Runner
    train.add_resume_hooks(off)                              # would refuse None there
    assert 'rng_state' not in off.default_hooks


# ---- in the Runner: a diverged run keeps the last good checkpoint; remote backends ----

@pytest.mark.slow  # a Runner run
def test_a_run_stopped_at_a_save_keeps_the_checkpoint_max_keep_ckpts_would_retire(tmp_path):
    from mmengine.runner import Runner

    from test_checkpoint_hooks import tiny_cfg
    from test_safety import PoisonHeadFactor
    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', interval=1, by_epoch=False,
                                        max_keep_ckpts=1)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(PoisonHeadFactor(at_iter=2))
    with pytest.raises(expand_mm.errors.NonFiniteError) as err:
        runner.train()
    first = osp.join(cfg.work_dir, 'iter_1.pth')
    assert f'Resume from {first}, the last checkpoint saved before it' in str(err.value)
    assert sorted(f for f in os.listdir(cfg.work_dir) if f.endswith(('.pth', '.tmp'))) == \
        ['iter_1.pth', 'iter_1_compact.pth']
    assert (Path(cfg.work_dir) / 'last_checkpoint').read_text() == first


@pytest.mark.slow  # a Runner run
def test_on_a_remote_backend_checkpoints_are_put_whole_and_retired_after(tmp_path):
    from mmengine.fileio import FileClient, register_backend
    from mmengine.runner import Runner

    from test_checkpoint_hooks import MemoryBackend, tiny_cfg
    register_backend('memtest', MemoryBackend, force=True, prefixes='memtest')
    FileClient.register_backend('memtest', MemoryBackend, force=True, prefixes='memtest')
    MemoryBackend.files.clear()
    cfg = tiny_cfg(tmp_path, max_iters=3)
    cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', interval=1, by_epoch=False,
                                        max_keep_ckpts=2, out_dir='memtest://bucket')
    Runner.from_cfg(cfg).train()
    names = sorted(k.rsplit('/', 1)[-1] for k in MemoryBackend.files)
    assert names == ['iter_2.pth', 'iter_2_compact.pth', 'iter_3.pth', 'iter_3_compact.pth']
    assert (Path(cfg.work_dir) / 'last_checkpoint').read_text() == 'memtest://bucket/work/iter_3.pth'
    assert torch.load(io.BytesIO(MemoryBackend.files['memtest://bucket/work/iter_3.pth']),
                      weights_only=True)['meta']['iter'] == 3


def test_the_check_hook_leaves_a_bad_auto_resume_file_to_the_safe_checkpoint_fallback(tmp_path):
    # ExpandNetCheckHook runs before SafeCheckpointHook in before_run; for a plain model
    # it reads the auto-resume file, which the fallback is about to pass over.
    from expand_mm.hooks.setup_checks import check_load_from
    write_checkpoint(tmp_path / 'iter_10.pth')
    write_checkpoint(tmp_path / 'iter_20.pth', readable=False)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_20.pth'))
    runner = fake_runner(tmp_path)
    runner.model = torch.nn.Linear(2, 2)
    runner.hooks = [expand_mm.SafeCheckpointHook(interval=10, by_epoch=False)]
    check_load_from(runner)  # no error: the fallback decides
    runner.hooks = []
    with pytest.raises(expand_mm.CheckpointError, match='iter_20.pth'):
        check_load_from(runner)
