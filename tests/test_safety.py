"""Safety under faults and bad input: non-finite weights, unsafe checkpoint files, and
mistakes in a config, each refused in one line that names the problem."""
import math
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

import expand_mm
from data_factory import make_coco
from expand_mm.errors import NonFiniteError
from mm_test_utils import shrink_for_test
from test_checkpoint_hooks import tiny_cfg
from wrapper_test_utils import DET_COMPACT, ROOT, build_model, load_tool, save_state


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


@pytest.mark.slow  # a Runner run or a tool's main
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


class CreatesFile:
    """Unpickled without weights-only loading, this creates ``path`` (``os.open``: a
    global of a module torch never unpickles from); the payload stays in the test's tmp dir."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.open, (self.path, os.O_CREAT | os.O_WRONLY)


def crafted_checkpoint(model: torch.nn.Module, path, marker) -> str:
    """A checkpoint of ``model``'s weights whose ``meta`` would create ``marker``."""
    torch.save({'state_dict': model.state_dict(), 'meta': CreatesFile(marker)}, path)
    return str(path)


REFUSED = r"cannot read checkpoint '.*crafted.pth': it holds a Python object other than " \
          r'tensors and plain values \(posix.open\)'


@pytest.fixture
def unsafe_env(monkeypatch):
    """torch's opt-out of weights-only loading, set as a user might."""
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


@pytest.mark.slow  # a Runner run or a tool's main
@pytest.mark.parametrize('path', ['load_from', 'resume', 'auto-resume', 'pretrained'])
def test_a_crafted_checkpoint_runs_nothing_on_any_load_path_of_a_run(tmp_path, unsafe_env,
                                                                     path):
    cfg = tiny_cfg(tmp_path)
    marker = tmp_path / 'marker'
    crafted = crafted_checkpoint(Runner.from_cfg(cfg.copy()).model, tmp_path / 'crafted.pth',
                                 marker)
    if path == 'pretrained':
        cfg.model.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=crafted)
    elif path == 'auto-resume':  # the work dir names the file mmengine resumes from
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(osp.join(cfg.work_dir, 'last_checkpoint'), 'w') as f:
            f.write(crafted)
        cfg.resume = True
    else:
        cfg.load_from = crafted
        cfg.resume = path == 'resume'
    runner = Runner.from_cfg(cfg)
    with pytest.raises(expand_mm.CheckpointError, match=REFUSED):
        runner.train()
    assert not marker.exists()


@pytest.mark.slow  # a Runner run or a tool's main
def test_a_crafted_teacher_or_later_registered_loader_runs_nothing(tmp_path, unsafe_env):
    """A distiller's local teacher file, and mmengine's load_checkpoint through a scheme
    registered after import (a loader that calls torch.load without weights_only)."""
    from mmengine.runner.checkpoint import CheckpointLoader, load_checkpoint
    from expand_mm.compat import guard_checkpoint_loaders
    marker = tmp_path / 'marker'
    kd = ROOT / ('projects/digits/configs/distill/'
                 'kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
    student = build_model(DET_COMPACT)
    crafted = crafted_checkpoint(student, tmp_path / 'crafted.pth', marker)
    with pytest.raises(expand_mm.CheckpointError, match=REFUSED):
        build_model(kd, teacher_ckpt=crafted).init_weights()
    CheckpointLoader.register_scheme(
        'crafted://', lambda name, map_location=None: torch.load(name[len('crafted://'):]))
    try:
        guard_checkpoint_loaders()
        with pytest.raises(expand_mm.CheckpointError, match=REFUSED):
            load_checkpoint(student, f'crafted://{crafted}')
    finally:
        CheckpointLoader._schemes.pop('crafted://')
    assert not marker.exists()


@pytest.mark.slow  # a Runner run or a tool's main
def test_the_train_tool_refuses_a_crafted_file_in_one_line_and_warns_about_the_opt_out(
        tmp_path):
    cfg = tiny_cfg(tmp_path)
    marker = tmp_path / 'marker'
    crafted = crafted_checkpoint(Runner.from_cfg(cfg.copy()).model, tmp_path / 'crafted.pth',
                                 marker)
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(osp.join(cfg.work_dir, 'last_checkpoint'), 'w') as f:  # for --resume alone
        f.write(crafted)
    cfg.dump(str(tmp_path / 'config.py'))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1', PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'),
                             str(tmp_path / 'config.py'), '--resume'], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and '(posix.open)' in errors[0]
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: torch.load would unpickle any object' \
           in result.stderr + result.stdout
    assert not marker.exists()


# ---- mistakes in a config: one error line each, through tools/train.py and the Runner ----

DIGITS_EXPANDNET = ROOT / ('projects/digits/configs/digits/'
                           'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
DIGITS_W2 = ROOT / 'projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py'
DIGIT_NAMES = tuple(str(i) for i in range(10))


def coco_cfg(tmp_path, config=DIGITS_EXPANDNET):
    """The digits detector (COCO format) shrunk to 1 iteration on 4 tiny images."""
    root = tmp_path / 'coco'
    if not root.is_dir():
        make_coco(str(root), num_images=4, size=64, class_names=DIGIT_NAMES)
    cfg = Config.fromfile(str(config))
    shrink_for_test(cfg, str(tmp_path / 'work'), f'{root}/', (64, 64), 1)
    load_tool('train').add_check_hook(cfg)  # as tools/train.py does, for Runner.from_cfg too
    return cfg


def voc_datasets(cfg):
    """The VOC2007 and VOC2012 dataset dicts of the VOC tiny config."""
    return cfg.train_dataloader.dataset.dataset.datasets


def train_tool_errors(cfg, tmp_path, capsys) -> list[str]:
    """Run tools/train.py in this process on ``cfg``; its exit code must be 2 with one
    ``error:`` line and no traceback, which is returned."""
    from expand_mm.cli import run_tool
    path = tmp_path / f'config_{len(list(tmp_path.glob("config_*.py")))}.py'
    cfg.dump(str(path))
    argv, sys.argv = sys.argv, ['train.py', str(path)]
    try:
        code = run_tool(load_tool('train').main)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in err, err[-3000:]
    return errors


def _wrong_width(cfg, tmp_path):
    """``load_from`` = the digits detector at twice the width (compact checkpoint)."""
    cfg.load_from = save_state(build_model(DIGITS_W2), tmp_path / 'w2.pth')


def _wrong_width_non_strict(cfg, tmp_path):
    _wrong_width(cfg, tmp_path)
    cfg.default_hooks.expand_load.strict = False


def _coco_names(names):
    def edit(cfg, tmp_path):
        cfg.train_dataloader.dataset.metainfo = dict(classes=names)
    return edit


def _num_classes(cfg, tmp_path):
    model = cfg.model.get('model', cfg.model)
    model.bbox_head.num_classes = 3


def _amp(cfg, tmp_path):
    cfg.optim_wrapper.type = 'AmpOptimWrapper'


MISTAKES = {  # name: (config, edit, what the error line says)
    'num_classes': (DIGITS_EXPANDNET, _num_classes,
                    "bbox_head.num_classes=3, but the training data has 10 classes ('0', "),
    'class_names': (DIGITS_EXPANDNET, _coco_names(tuple(f'digit{n}' for n in DIGIT_NAMES)),
                    "none of the metainfo classes ('digit0', 'digit1', 'digit2', "),
    'class_order': (DIGITS_EXPANDNET, _coco_names(DIGIT_NAMES[::-1]),
                    "'0' would get label 0, which the metainfo classes call '9'"),
    'one_class_name': (DIGITS_EXPANDNET, _coco_names(DIGIT_NAMES[:9] + ('nine',)),
                       "the metainfo classes ('nine',) are not category names of"),
    'amp_on_cpu': (DIGITS_EXPANDNET, _amp, "optim_wrapper.type='AmpOptimWrapper' (automatic "
                   'mixed precision) needs a CUDA GPU'),
    'load_from_other_width': (DET_COMPACT, _wrong_width, 'w2.pth\' fits only '),
    'load_from_other_width_non_strict': (DIGITS_EXPANDNET, _wrong_width_non_strict,
                                         'w2.pth fits only '),
}


@pytest.mark.slow  # a Runner run or a tool's main
@pytest.mark.skipif(torch.cuda.is_available(), reason='AMP trains on a GPU')
@pytest.mark.parametrize('mistake', sorted(MISTAKES))
def test_each_mistake_ends_in_one_line_from_the_tool_and_from_the_runner(tmp_path, capsys,
                                                                          mistake):
    config, edit, says = MISTAKES[mistake]
    cfg = coco_cfg(tmp_path, config)
    edit(cfg, tmp_path)
    assert says in train_tool_errors(cfg.copy(), tmp_path, capsys)[0]
    with pytest.raises(expand_mm.ExpandMMError) as err:
        Runner.from_cfg(cfg).train()
    assert says in str(err.value)
    assert not list((tmp_path / 'work').glob('*.pth'))


@pytest.mark.slow  # a Runner run or a tool's main
def test_voc_annotation_mistakes_end_in_one_line_from_the_tool(tmp_path, capsys):
    """A listed image without its XML file, and class names no object has (found before
    the dataset is built: mmdet would fail mid-build or train on empty images)."""
    cfg = tiny_cfg(tmp_path)
    for dataset in voc_datasets(cfg):
        dataset.metainfo = dict(classes=('cat', 'dog'))
    error = train_tool_errors(cfg, tmp_path, capsys)[0]
    assert "no object in the first 3 annotation files under" in error
    assert "is one of the metainfo classes ('cat', 'dog'); they name ('bicycle'," in error
    cfg = tiny_cfg(tmp_path)
    xml = tmp_path / 'data/VOC2007/Annotations/2007_000001.xml'
    xml.unlink()
    error = train_tool_errors(cfg, tmp_path, capsys)[0]
    assert f"1 of the 3 images listed in '{tmp_path}/data/VOC2007/ImageSets/Main/" \
           f"trainval.txt' have no annotation file, e.g. '{xml}'" in error


@pytest.mark.slow  # a Runner run or a tool's main
def test_voc_class_names_no_object_has_are_refused_by_the_runner_too(tmp_path):
    cfg = tiny_cfg(tmp_path)  # its datasets keep empty images, so they build
    for dataset in voc_datasets(cfg):
        dataset.metainfo = dict(classes=('cat', 'dog'))
    with pytest.raises(expand_mm.ConfigError, match="is one of the metainfo classes "
                                                    r"\('cat', 'dog'\); they name"):
        Runner.from_cfg(cfg).train()
