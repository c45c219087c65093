"""Command-line tools on wrong input: a checkpoint that does not fit, output = input."""
import hashlib
import shutil
import os
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from PIL import Image

import expand_mm  # noqa: F401  (registers ExpandNet)
from wrapper_test_utils import ROOT, load_tool

COMPACT = ROOT / 'configs/yolo_lite/yolo-lite_8xb16-100e_voc0712.py'
EXPANDNET = ROOT / 'configs/expandnet/expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py'


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def expandnet_checkpoint(tmp_path_factory):
    """A training checkpoint of the VOC YOLO-LITE ExpandNet (fresh weights)."""
    cfg = Config.fromfile(str(EXPANDNET))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    path = tmp_path_factory.mktemp('ckpt') / 'iter_1.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


@pytest.mark.slow
def test_test_tool_refuses_a_training_checkpoint_with_the_compact_config(expandnet_checkpoint):
    # mmengine would load it non-strictly and score an untrained model.
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'test.py'), str(COMPACT),
                             str(expandnet_checkpoint)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'does not fit YOLOV3: missing' in result.stderr
    assert ("It is an ExpandNet training checkpoint (15 layers, e.g. 'backbone.stages.0.conv.conv', "
            'are expanded chains): use its *_compact.pth (or python tools/contract.py') \
        in result.stderr
    assert 'Traceback' not in result.stderr
    onnx = subprocess.run([sys.executable, str(ROOT / 'tools' / 'export_onnx.py'), str(COMPACT),
                           str(expandnet_checkpoint), str(expandnet_checkpoint) + '.onnx'],
                          capture_output=True, text=True, cwd=ROOT)
    assert onnx.returncode == 2 and 'Traceback' not in onnx.stderr, onnx.stderr[-2000:]
    assert 'It is an ExpandNet training checkpoint' in onnx.stderr
    assert 'use its *_compact.pth' in onnx.stderr


def test_test_tool_takes_a_checkpoint_with_extra_entries_and_says_so(tmp_path, capsys):
    from expand_mm.checkpoint import CheckpointError
    # Not load_tool('test'): under that name it would shadow the standard library's `test`.
    spec = importlib.util.spec_from_file_location('expand_mm_test_tool', ROOT / 'tools/test.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = Config.fromfile(str(COMPACT))
    with DefaultScope.overwrite_default_scope('mmdet'):
        state = MODELS.build(cfg.model).state_dict()
    tool.check_plain_checkpoint(cfg, {**state, 'aux_head.weight': torch.zeros(1)}, 'a.pth')
    assert 'has 1 entries that this model does not use, ignored: aux_head.weight' in (
        capsys.readouterr().out)
    # Older checkpoints lack BN's step counters: not refused.
    counters = [k for k in state if k.endswith('num_batches_tracked')]
    tool.check_plain_checkpoint(cfg, {k: v for k, v in state.items() if k not in counters},
                                'old.pth')
    state.pop('neck.conv1.conv.weight')
    with pytest.raises(CheckpointError, match=r'missing \(1\): neck.conv1.conv.weight'):
        tool.check_plain_checkpoint(cfg, state, 'a.pth')


def run_contract(*args) -> int:
    """``tools/contract.py EXPANDNET ARGS...``'s exit code, run in this process."""
    from expand_mm.cli import run_tool
    contract = load_tool('contract')
    argv, sys.argv = sys.argv, ['contract.py', str(EXPANDNET), *map(str, args)]
    try:
        return run_tool(contract.main)
    finally:
        sys.argv = argv


@pytest.mark.slow
def test_contract_and_export_never_overwrite_their_input(expandnet_checkpoint, tmp_path):
    before = _digest(expandnet_checkpoint)
    alias = tmp_path / 'alias.pth'
    alias.symlink_to(expandnet_checkpoint)
    for out in (expandnet_checkpoint, alias):
        assert run_contract(expandnet_checkpoint, out) == 2
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'export_onnx.py'),
                             str(EXPANDNET), str(expandnet_checkpoint), str(alias)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and 'would overwrite it' in result.stderr, result.stderr
    assert _digest(expandnet_checkpoint) == before


@pytest.mark.slow
def test_contract_refuses_a_folder_as_output_before_any_work(expandnet_checkpoint, tmp_path,
                                                             capsys):
    assert run_contract(expandnet_checkpoint, tmp_path) == 2
    assert f"the output '{tmp_path}' is a folder; give a file path, e.g. " \
        f"'{tmp_path / 'iter_1.pth'}'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no leftover .tmp


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from expand_mm.deploy import write_compact_checkpoint
    cfg = Config.fromfile(str(EXPANDNET))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    src = tmp_path / 'iter_1.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, src)

    def full_disk(src, dst):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr('expand_mm.deploy.os.replace', full_disk)
    with pytest.raises(OSError, match='No space left'):
        write_compact_checkpoint(model, str(src), str(tmp_path / 'out.pth'), verify=False)
    assert sorted(os.listdir(tmp_path)) == ['iter_1.pth']


def test_the_old_deploy_aliases_warn_and_name_their_module():
    import expand_mm.cost
    import expand_mm.deploy
    with pytest.warns(DeprecationWarning, match=r'import it from expand_mm\.cost'):
        assert expand_mm.deploy.count_macs is expand_mm.cost.count_macs
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        expand_mm.deploy.no_such_name


@pytest.mark.slow
def test_contract_creates_the_output_folder(expandnet_checkpoint, tmp_path, capsys):
    out = tmp_path / 'new' / 'folder' / 'compact.pth'
    assert run_contract(expandnet_checkpoint, out, '--img-size', '64', '64') == 0
    printed = capsys.readouterr().out
    assert f'wrote {out}' in printed and 'input size 64x64 (--img-size)' in printed
    assert 'already holds the compact form' not in printed
    # Given the compact checkpoint it wrote, it says so (and writes the same network).
    again = tmp_path / 'again.pth'
    assert run_contract(out, again, '--img-size', '64', '64') == 0
    assert f'note: {out} already holds the compact form' in capsys.readouterr().out
    for key, value in torch.load(out)['state_dict'].items():
        torch.testing.assert_close(torch.load(again)['state_dict'][key], value)
    cfg = Config.fromfile(str(COMPACT))
    with DefaultScope.overwrite_default_scope('mmdet'):
        MODELS.build(cfg.model).load_state_dict(torch.load(out)['state_dict'], strict=True)


@pytest.mark.slow
def test_contract_writes_the_compact_config_that_the_stock_api_runs(expandnet_checkpoint,
                                                                     tmp_path, capsys):
    """OUT.py beside OUT.pth: the stock model config (ExpandNet unwrapped, expand_mm's
    hooks dropped), so mmdet's init_detector needs nothing else."""
    from mmdet.apis import init_detector
    out = tmp_path / 'deploy' / 'yolo-lite_compact.pth'
    assert run_contract(expandnet_checkpoint, out, '--img-size', '64', '64') == 0
    config = tmp_path / 'deploy' / 'yolo-lite_compact.py'
    assert f'wrote {config}' in capsys.readouterr().out
    written = Config.fromfile(str(config))
    assert written.model.to_dict() == Config.fromfile(str(COMPACT)).model.to_dict()
    assert not {'expand_load', 'expand_contract', 'expand_check'} & set(written.default_hooks)
    deployed = init_detector(str(config), str(out), device='cpu')
    assert type(deployed).__name__ == 'YOLOV3' and not expand_mm.expanded_layers(deployed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        trained = MODELS.build(Config.fromfile(str(EXPANDNET)).model).eval()
    trained.load_state_dict(torch.load(expandnet_checkpoint)['state_dict'])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(deployed(x, mode='tensor')[0], trained(x, mode='tensor')[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # The config goes where the checkpoint's name says, never over the checkpoint or the
    # input config.
    assert run_contract(expandnet_checkpoint, tmp_path / 'x.py') == 2
    assert "ends in .py, where the compact config is written" in capsys.readouterr().err
    copy = tmp_path / 'expandnet.py'
    shutil.copy(EXPANDNET, copy)
    from expand_mm.cli import run_tool
    contract = load_tool('contract')
    argv, sys.argv = sys.argv, ['contract.py', str(copy), str(expandnet_checkpoint),
                                str(tmp_path / 'expandnet.pth')]
    try:
        assert run_tool(contract.main) == 2
    finally:
        sys.argv = argv
    assert 'the input config' in capsys.readouterr().err
    assert copy.read_text() == EXPANDNET.read_text()


def test_train_tool_finds_and_adds_the_check_hook_in_default_hooks():
    train = load_tool('train')
    cfg = Config.fromfile(str(EXPANDNET))  # carries it as default_hooks.expand_check
    before = cfg.to_dict()
    train.add_check_hook(cfg)
    assert cfg.to_dict() == before
    compact = Config.fromfile(str(COMPACT))
    train.add_check_hook(compact)
    assert compact.default_hooks.expand_check == dict(type='ExpandNetCheckHook')
    assert 'custom_hooks' not in compact
    stock = Config.fromfile(str(COMPACT)).default_hooks
    assert {k: v for k, v in compact.default_hooks.items() if k != 'expand_check'} == stock


@pytest.mark.parametrize('config,size', [
    # CK chains of 3x3 convs, strided
    ('configs/expandnet/expandnet-ck-r4_yolo-lite-k5_8xb16-100e_voc0712.py', (96, 128)),
    # a decoder stage whose output the trace finds dead counts nothing
    ('projects/digits/configs/digits/'
     'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
     (64, 96)),
])
def test_training_macs_from_shapes_equal_the_explicit_trace(config, size):
    from expand_mm.cost import count_macs, count_training_macs
    from expand_mm.surgery import contract_model, set_expand_mode
    cfg = Config.fromfile(str(ROOT / config))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model).eval()
    compact = contract_model(model).eval()
    compact_macs, training_macs = count_training_macs(model, compact, size)
    assert compact_macs == count_macs(compact, size)
    set_expand_mode(model, 'explicit')
    assert training_macs == count_macs(model, size)
    assert training_macs > 2 * compact_macs  # the chains cost more than the compact layers


def test_input_size_comes_from_the_test_settings():
    from expand_mm.cost import config_input_size
    digits = Config.fromfile(str(ROOT / 'projects/digits/configs/digits/'
                                 'yolo-lite_1xb16-900i_digits-det-64x64.py'))
    assert config_input_size(digits) == (
        (64, 64), 'test-pipeline Resize scale (keep_ratio: images are fitted into this box)')
    yolox = Config.fromfile(str(ROOT / 'configs/yolox/yolox_tiny_8xb8-300e_coco.py'))
    assert config_input_size(yolox) == ((416, 416), 'test-pipeline Resize scale, padded to it')
    cityscapes = Config.fromfile(str(ROOT / 'configs/unet/unet-s5-d16-c16_fcn_4xb4-160k_'
                                 'cityscapes-512x1024.py'))
    size, source = config_input_size(cityscapes)
    assert size == (1024, 2048)  # mmcv's scale is (W, H)
    assert 'keep_ratio' in source  # the box images are fitted into
    # Sliding-window testing runs the network on crops, in any wrapper: (H, W) of the crop.
    expandnet = Config.fromfile(str(ROOT / 'configs/expandnet/expandnet-cl-r4_unet-s5-d16-c16-'
                                'fcn_4xb4-160k_cityscapes-512x1024.py'))
    expandnet.model.model.test_cfg = dict(mode='slide', crop_size=(512, 1024), stride=(340, 682))
    assert config_input_size(expandnet) == ((512, 1024),
                                            'sliding-window test_cfg.crop_size (H, W)')
    expandnet.model.model.test_cfg = dict(mode='whole')
    assert config_input_size(expandnet)[0] == (1024, 2048)
    assert config_input_size(Config(dict(test_pipeline=[dict(type='Resize', scale=300)]))) \
        == ((300, 300), 'test-pipeline Resize scale')
    assert config_input_size(Config(dict(test_pipeline=[dict(type='LoadImageFromFile')]))) \
        is None


def test_check_hook_refuses_an_expandnet_checkpoint_for_a_compact_config(expandnet_checkpoint,
                                                                         tmp_path):
    from mmengine.runner import Runner

    from data_factory import make_voc
    from expand_mm.checkpoint import CheckpointError
    from expand_mm.hooks.setup_checks import check_load_from
    from mm_test_utils import shrink_for_test
    data_root = str(tmp_path / 'data')
    make_voc(data_root, num_images=3, size=96)

    def runner(load_from, resume=False):
        cfg = Config.fromfile(str(COMPACT))
        shrink_for_test(cfg, str(tmp_path / 'work'), data_root + '/', (96, 96), 1)
        cfg.load_from = None if load_from is None else str(load_from)
        cfg.resume = resume
        return Runner.from_cfg(cfg)

    with pytest.raises(CheckpointError, match=r"load_from='.*iter_1.pth' is an ExpandNet training "
                                              r"checkpoint of this model \(15 layers"):
        check_load_from(runner(expandnet_checkpoint))
    with pytest.raises(CheckpointError, match=r'iter_1.pth does not fit YOLOV3: missing'):
        check_load_from(runner(expandnet_checkpoint, resume=True))
    # --resume alone: the latest checkpoint of the work dir, found as mmengine finds it.
    auto = runner(None, resume=True)
    shutil.copy(expandnet_checkpoint, tmp_path / 'work' / 'iter_1.pth')
    (tmp_path / 'work' / 'last_checkpoint').write_text(str(tmp_path / 'work' / 'iter_1.pth'))
    with pytest.raises(CheckpointError, match=r'work/iter_1.pth does not fit YOLOV3: missing'):
        check_load_from(auto)
    # Fine-tuning from a partial checkpoint (backbone only) stays allowed.
    with DefaultScope.overwrite_default_scope('mmdet'):
        state = MODELS.build(Config.fromfile(str(COMPACT)).model).state_dict()
    partial = tmp_path / 'backbone.pth'
    torch.save({'state_dict': {k: v for k, v in state.items() if k.startswith('backbone.')},
                'meta': {}}, partial)
    check_load_from(runner(partial))
    # A wrapper's training checkpoint holds the model under a prefix (next to a teacher
    # with the same key names but other shapes); another model's gives it no weight.
    wrapped = tmp_path / 'distiller.pth'
    torch.save({'state_dict': {**{'student.' + k: v for k, v in state.items()},
                               **{'teacher.' + k: torch.zeros(2, *v.shape[1:])
                                  for k, v in state.items() if v.dim() > 1}}}, wrapped)
    with pytest.raises(CheckpointError, match=r"distiller.pth' would load nothing: its entries "
                                              r"for this model are under 'student.'"):
        check_load_from(runner(wrapped))
    stripped = tmp_path / 'imagenet_backbone.pth'  # a backbone file without its prefix
    torch.save({'state_dict': {k[len('backbone.'):]: v for k, v in state.items()
                               if k.startswith('backbone.')}}, stripped)
    with pytest.raises(CheckpointError, match=r"imagenet_backbone.pth' holds the weights of this "
                                              r"model's 'backbone' without the 'backbone.' prefix"
                                              r".*init_cfg=dict\(type='Pretrained'"):
        check_load_from(runner(stripped))
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'decode_head.conv_seg.weight': torch.zeros(2, 4, 1, 1)}}, other)
    with pytest.raises(CheckpointError, match=r"other.pth' has none of the \d+ weights of this "
                                              r"YOLOV3 .* it is a checkpoint of another model"):
        check_load_from(runner(other))


@pytest.mark.slow
def test_contract_verify_keeps_the_traceback_of_a_probe_that_crashes(expandnet_checkpoint,
                                                                     tmp_path):
    """A probe too small for the network fails inside its forward pass: that is not a
    wrong contraction, and the error propagates as it is (no 'refusing to write')."""
    with pytest.raises(RuntimeError) as raised:
        run_contract(expandnet_checkpoint, tmp_path / 'c.pth', '--verify', '--img-size', '1', '1')
    assert 'refusing to write' not in str(raised.value)
    assert not (tmp_path / 'c.pth').exists()


def test_a_legacy_format_checkpoint_is_read_even_when_memory_mapping_is_asked(tmp_path):
    from expand_mm.checkpoint import read_checkpoint
    path = tmp_path / 'legacy.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': {}}, path,
               _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(str(path), mmap=True)['state_dict']['w'], torch.ones(2))


def test_check_hook_warns_about_what_an_expandnet_config_leaves_out(tmp_path):
    """AdamW without the per-factor rates, and no ContractCheckpointHook: both said; the
    project's configs (SGD with the constructor, and AdamW with it) say nothing."""
    from mmengine.runner import Runner
    from expand_mm.checks import missing_setup_warnings

    def warnings_of(cfg, runner=None):
        cfg.work_dir = str(tmp_path / 'work')
        runner = runner or Runner.from_cfg(cfg)
        return missing_setup_warnings(cfg, runner.model, runner.hooks)

    assert warnings_of(Config.fromfile(str(EXPANDNET))) == []
    assert warnings_of(Config.fromfile(str(COMPACT))) == []
    digits = ROOT / ('projects/digits/configs/digits/'
                     'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
    assert warnings_of(Config.fromfile(str(digits))) == []
    bare = Config.fromfile(str(digits))
    bare.optim_wrapper.pop('constructor')
    bare.default_hooks.pop('expand_contract')
    optimizer, hooks = warnings_of(bare)
    assert optimizer.startswith('15 expanded layers train with AdamW at the base rate: set '
                                "optim_wrapper.constructor='ExpandNetOptimWrapperConstructor'")
    assert hooks.startswith('no ContractCheckpointHook among the hooks')
    runner = Runner.from_cfg(bare)
    bare.optim_wrapper.optimizer.type = torch.optim.AdamW  # pure-Python config style
    assert warnings_of(bare, runner)[0] == optimizer


@pytest.mark.slow
def test_train_and_test_tools_refuse_amp_on_cpu_and_missing_data_in_one_line(
        tmp_path, expandnet_checkpoint):
    if not torch.cuda.is_available():  # --amp is refused first, before any work
        result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'),
                                 str(COMPACT), '--amp'], capture_output=True, text=True,
                                cwd=tmp_path)
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
        assert "error: --amp needs a GPU" in result.stderr
    for tool, args in (('train.py', [str(COMPACT), '--work-dir', str(tmp_path / 'w')]),
                       ('test.py', [str(EXPANDNET), str(expandnet_checkpoint)])):
        # The config's data_root is relative: run where there is no data below it.
        result = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *args],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2, (tool, result.stderr[-2000:])
        error = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
        assert len(error) == 1 and 'Traceback' not in result.stderr, (tool, result.stderr)
        assert f"i.e. '{tmp_path}/data/VOCdevkit" in error[0], error


@pytest.mark.slow
def test_test_tool_tta_and_out_evaluate_the_compact_twin_as_the_expanded_model(tmp_path):
    """--tta wraps the model tested (the compact one for a *_compact.pth) in the config's
    tta_model; --out dumps the predictions. Same predictions from both checkpoints."""
    from mmengine.runner import Runner

    from data_factory import make_cityscapes
    from mm_test_utils import shrink_for_test
    config = ROOT / ('configs/expandnet/expandnet-cl-r4_unet-s5-d16-c16-fcn_4xb4-160k_'
                     'cityscapes-512x1024.py')
    data_root = str(tmp_path / 'data') + '/'
    make_cityscapes(data_root, num_images=2, size=(64, 128))
    cfg = Config.fromfile(str(config))
    shrink_for_test(cfg, str(tmp_path / 'work'), data_root, (64, 128), max_iters=1)
    Runner.from_cfg(cfg).train()
    test = load_tool('test')
    predictions = {}
    painted = tmp_path / 'painted'
    for name in ('iter_1.pth', 'iter_1_compact.pth'):
        out = tmp_path / f'out_{name}'
        # mmseg paints every `interval`-th image: 1 paints both. The first run's visualizer
        # (the stock name, no save_dir) exists in this process: the second must not reuse it.
        show = ['--show-dir', str(painted)] if name == 'iter_1_compact.pth' else []
        argv, sys.argv = sys.argv, [
            'test.py', str(config), str(tmp_path / 'work' / name), '--tta', '--out', str(out),
            '--work-dir', str(tmp_path / f'test_{name}'), *show, '--cfg-options',
            f'test_dataloader.dataset.data_root={data_root}', 'test_dataloader.batch_size=1',
            'default_hooks.visualization.interval=1',
            # mmseg's hook reads runner.iter, which builds the training loop and its data.
            f'train_dataloader.dataset.data_root={data_root}']
        try:
            assert test.main() == 0
        finally:
            sys.argv = argv
        dumped = Config.fromfile(str(tmp_path / f'test_{name}' / config.name))
        assert dumped.model.type == 'SegTTAModel'
        assert (dumped.model.module.type == 'ExpandNet') == (name == 'iter_1.pth')
        files = sorted(out.rglob('*.png'))
        assert len(files) == 2, files
        predictions[name] = [np.asarray(Image.open(f)) for f in files]
    for a, b in zip(*predictions.values()):
        assert (a == b).mean() > 0.999
    # --show-dir: the stock SegVisualizationHook painted each test image there.
    drawn = sorted(painted.rglob('*.png'))
    assert len(drawn) == 2 and all('test_' in f.name for f in drawn), drawn


@pytest.mark.slow
def test_test_tool_show_dir_paints_detections_like_mmdet(tmp_path, expandnet_checkpoint):
    """--show-dir on a detector: DetVisualizationHook writes one painted image per test
    image under WORK_DIR/TIMESTAMP/SHOW_DIR, as mmdet's test.py does."""
    from data_factory import make_voc
    from mm_test_utils import shrink_for_test
    data_root = str(tmp_path / 'data') + '/'
    make_voc(data_root, num_images=2, size=96)
    cfg = Config.fromfile(str(EXPANDNET))
    shrink_for_test(cfg, str(tmp_path / 'work'), data_root, (96, 96))
    config = tmp_path / 'expandnet_yolo_lite.py'
    cfg.dump(str(config))
    test = load_tool('test')
    argv, sys.argv = sys.argv, ['test.py', str(config), str(expandnet_checkpoint),
                                '--show-dir', 'painted']
    try:
        assert test.main() == 0
    finally:
        sys.argv = argv
    drawn = sorted((tmp_path / 'work').glob('*/painted/*.jpg'))
    test_images = (tmp_path / 'data' / 'VOC2007' / 'ImageSets' / 'Main' / 'test.txt')
    assert len(drawn) == len(test_images.read_text().split()) == 2, drawn
    assert Image.open(drawn[0]).size == (2 * 96, 96)  # ground truth beside the prediction


def test_test_tool_show_and_wait_time_set_the_stock_hook():
    from expand_mm.cli import UsageError
    test = load_tool('test')
    det = Config(dict(default_hooks=dict(visualization=dict(type='DetVisualizationHook'))))
    test.enable_visualisation(det, None, show=True, wait_time=0.5)
    assert det.default_hooks.visualization == dict(
        type='DetVisualizationHook', draw=True, show=True, wait_time=0.5)
    seg = Config(dict(default_hooks=dict(visualization=dict(type='SegVisualizationHook')),
                      visualizer=dict(type='SegLocalVisualizer', name='visualizer')))
    test.enable_visualisation(seg, 'out')
    assert seg.default_hooks.visualization == dict(type='SegVisualizationHook', draw=True)
    assert seg.visualizer == dict(type='SegLocalVisualizer', save_dir='out')
    with pytest.raises(UsageError, match=r'--show / --show-dir need '
                                         r'default_hooks.visualization'):
        test.enable_visualisation(Config(dict(default_hooks=dict())), 'out')


@pytest.mark.slow
def test_test_tool_tta_without_tta_settings_is_refused(expandnet_checkpoint, capsys):
    test = load_tool('test')
    from expand_mm.cli import run_tool
    argv, sys.argv = sys.argv, ['test.py', str(EXPANDNET), str(expandnet_checkpoint), '--tta']
    try:
        assert run_tool(test.main) == 2
    finally:
        sys.argv = argv
    assert 'error: --tta needs tta_model and tta_pipeline in the config' in capsys.readouterr().err


def test_tools_print_their_own_checks_in_one_line_and_keep_other_tracebacks(capsys, tmp_path):
    """A ``raise`` in expand_mm (a check with a message for the user) becomes one
    ``error:`` line and exit code 2; an error elsewhere (a config, mmengine, a bug) keeps
    its traceback, and ``EXPAND_MM_TRACEBACK=1`` shows every traceback."""
    from expand_mm.cli import is_own_check, require_file, run_tool
    from expand_mm.optim.factor_lr import check_factor_lr

    def refused() -> int:
        check_factor_lr('fan_out', 'sum')
        return 0

    assert run_tool(refused) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: paramwise_cfg.factor_lr='fan_out'") and err.count('\n') == 1

    def missing() -> int:
        require_file(str(tmp_path / 'nope.py'), 'config')
        return 0

    assert run_tool(missing) == 2
    assert capsys.readouterr().err == (f"error: config '{tmp_path}/nope.py' does not exist "
                                       f"(looked at '{tmp_path}/nope.py')\n")

    def config_mistake() -> int:
        return {'a': 1}['b']  # not a raise statement of expand_mm: a traceback

    with pytest.raises(KeyError):
        run_tool(config_mistake)
    with pytest.raises(FileNotFoundError) as raised:  # raised inside mmengine
        Config.fromfile(str(tmp_path / 'nope.py'))
    assert not is_own_check(raised.value)

    def unfinished() -> int:  # an extension point a subclass left out: a traceback
        from expand_mm.models.wrappers import TrainingWrapper
        return TrainingWrapper.loss(None, None, None)

    with pytest.raises(NotImplementedError):
        run_tool(unfinished)
    os.environ['EXPAND_MM_TRACEBACK'] = '1'
    try:
        with pytest.raises(ValueError, match='factor_lr'):
            run_tool(refused)
    finally:
        del os.environ['EXPAND_MM_TRACEBACK']


def test_missing_digits_data_names_the_command_that_writes_it(tmp_path):
    """The 64x64 configs read data/digits64: the hint gives the options that write it."""
    from expand_mm.datasets_check import check_datasets
    cfg = Config.fromfile(str(ROOT / 'projects/digits/configs/distill/'
                              'yolo-lite-w2_1xb16-900i_digits-det-64x64.py'))
    cfg.train_dataloader.dataset.data_root = f'{tmp_path}/digits64/digits_det/'
    with pytest.raises(FileNotFoundError, match=(
            rf'run `python projects/digits/tools/make_digits_data.py --out {tmp_path}/digits64 '
            r'--img-size 64 --min-scale 16 --max-scale 32 --max-digits 4`')):
        check_datasets(cfg, ('train_dataloader',))


def test_a_misspelled_key_of_a_registered_class_is_named_with_the_nearest_option(capsys):
    """MMEngine builds classes with ``cls(**cfg)``: Python's bare TypeError becomes the
    class, the key and what it takes; other TypeErrors keep their traceback."""
    from mmengine.registry import HOOKS

    from expand_mm.cli import run_tool

    def misspelled() -> int:
        HOOKS.build(dict(type='ContractCheckpointHook', verifyy=True))
        return 0

    assert run_tool(misspelled) == 2
    assert capsys.readouterr().err == (
        "error: ContractCheckpointHook has no option 'verifyy'; did you mean 'verify'? "
        'ContractCheckpointHook takes suffix, probe_shape, rtol, verify\n')

    def called_wrongly() -> int:
        return int(sum([1], startt=0))  # a TypeError of code, not of a config

    with pytest.raises(TypeError):
        run_tool(called_wrongly)


def test_pretrained_weights_that_cannot_be_downloaded_say_where_the_file_goes(
        capsys, monkeypatch):
    """Offline, a config's open-mmlab:// backbone ends in urllib's bare error: it is
    named with its URL and torch's cache path (the download is simulated to fail)."""
    import urllib.error

    import mmengine.runner.checkpoint as mm_checkpoint
    import torch.hub

    from expand_mm.cli import run_tool

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('[Errno -2] Name or service not known')

    monkeypatch.setattr(mm_checkpoint, 'load_url', offline)
    config = ROOT / 'configs/expandnet/expandnet-cl-r4_yolov3-mobilenetv2_8xb24-320-300e_voc0712.py'

    def init() -> int:
        cfg = Config.fromfile(str(config))
        with DefaultScope.overwrite_default_scope('mmdet'):
            MODELS.build(cfg.model).init_weights()
        return 0

    assert run_tool(init) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints',
                         'mobilenet_v2_batch256_imagenet-ff34753d.pth')
    assert err.startswith("error: could not download the pretrained weights "
                          "'open-mmlab://mmdet/mobilenet_v2' (https://"), err
    assert f'copy the file to {cache!r}' in err

    def disk_full(url, *args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(mm_checkpoint, 'load_url', disk_full)
    with pytest.raises(OSError, match='No space left'):  # not the network: left as it is
        run_tool(init)


def test_test_tool_out_and_tta_edit_the_config_as_mmdet_and_mmseg_do():
    """--out: mmdet's DumpDetResults after the metrics (a .pkl only), mmseg's label maps
    through every IoUMetric of a list evaluator; --tta: YOLO-style batch shapes off."""
    from expand_mm.cli import UsageError
    test = load_tool('test')
    det = Config(dict(default_scope='mmdet', test_evaluator=dict(type='CocoMetric')))
    test.dump_predictions(det, 'preds.pkl')
    assert det.test_evaluator == [dict(type='CocoMetric'),
                                  dict(type='DumpDetResults', out_file_path='preds.pkl')]
    with pytest.raises(UsageError, match=r"--out 'preds.json': mmdet dumps predictions to a "
                                         r'.pkl or .pickle file'):
        test.dump_predictions(det, 'preds.json')
    seg = Config(dict(default_scope='mmseg', test_evaluator=[
        dict(type='IoUMetric', iou_metrics=['mIoU']), dict(type='mmseg.IoUMetric'),
        dict(type='CityscapesMetric')]))
    test.dump_predictions(seg, 'maps')
    assert [e.get('output_dir') for e in seg.test_evaluator] == ['maps', 'maps', None]
    from mmseg.evaluation import IoUMetric
    python_style = Config(dict(default_scope='mmseg', test_evaluator=dict(type=IoUMetric)))
    test.dump_predictions(python_style, 'maps')  # a class type (pure-Python configs)
    assert python_style.test_evaluator['output_dir'] == 'maps'
    assert all(e['keep_results'] for e in seg.test_evaluator[:2])
    with pytest.raises(UsageError, match=r"mmseg writes label maps through an IoUMetric in "
                                         r"test_evaluator, and this config has none"):
        test.dump_predictions(Config(dict(test_evaluator=dict(type='CityscapesMetric'))), 'm')
    yolo = Config(dict(model=dict(type='YOLOV3'), tta_model=dict(type='DetTTAModel'),
                       tta_pipeline=[dict(type='LoadImageFromFile')],
                       test_dataloader=dict(dataset=dict(type='RepeatDataset', dataset=dict(
                           type='YOLOv5CocoDataset', batch_shapes_cfg=dict(size_divisor=32),
                           pipeline=[])))))
    test.enable_tta(yolo)
    dataset = yolo.test_dataloader.dataset.dataset
    assert dataset.batch_shapes_cfg is None and dataset.pipeline == yolo.tta_pipeline
    assert yolo.model == dict(type='DetTTAModel', module=dict(type='YOLOV3'))
