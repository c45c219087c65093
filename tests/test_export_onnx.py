"""ONNX export of the deployed compact model, from a training or a compact checkpoint."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
EXPANDNET = osp.join(ROOT, 'configs', 'expandnet', 'expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py')

pytestmark = pytest.mark.slow


def test_export_from_a_training_checkpoint_matches_onnxruntime(tmp_path):
    import expand_mm  # noqa: F401
    cfg = Config.fromfile(EXPANDNET)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    ckpt = tmp_path / 'iter_1.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    out = tmp_path / 'model.onnx'
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'export_onnx.py'),
                             EXPANDNET, str(ckpt), str(out), '--img-size', '96', '96'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    error = float(result.stdout.rsplit('max abs error', 1)[1])
    assert error < 1e-3
    import onnx
    graph = onnx.load(str(out)).graph
    convs = [n for n in graph.node if n.op_type == 'Conv']
    compact_convs = sum(isinstance(m, torch.nn.Conv2d)
                        for m in expand_mm.contract_model(model).modules())
    assert len(convs) == compact_convs  # the deployed graph has the compact layers only


def test_export_refuses_a_checkpoint_of_another_model(tmp_path):
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': {'conv.weight': torch.zeros(4, 3, 3, 3)}}, ckpt)
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'export_onnx.py'),
                             EXPANDNET, str(ckpt), str(tmp_path / 'x.onnx')],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert 'fits neither' in result.stderr and 'conv.weight' in result.stderr


def test_export_takes_a_training_wrappers_checkpoint_and_names_it_with_the_compact_config(
        tmp_path):
    """An AuxOverParam (ExpandNet inside) training checkpoint exports its contracted main
    branch with the wrapper config; with the compact config it is refused, naming the
    prefix its network sits under and what to use."""
    import expand_mm
    from wrapper_test_utils import DET_COMPACT, ROOT as REPO, build_model, save_state
    aux = REPO / ('projects/digits/configs/aux/'
                  'aux-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
    torch.manual_seed(0)
    model = build_model(aux)
    ckpt = save_state(model, tmp_path / 'iter_1.pth')
    out = tmp_path / 'aux.onnx'
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'export_onnx.py'),
                             str(aux), ckpt, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    params = sum(p.numel() for p in expand_mm.contract_model(model.model).parameters())
    assert f'wrote {out}: {params:,} params, input 1x3x64x64' in result.stdout
    assert float(result.stdout.rsplit('max abs error', 1)[1]) < 1e-3
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'export_onnx.py'),
                             str(DET_COMPACT), ckpt, str(out)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert "Its entries for this model are under 'model.': it is a training checkpoint of a " \
           'training-time wrapper' in result.stderr


def _export_in_process(config, checkpoint, out, capsys) -> tuple[int, list[str]]:
    """``tools/export_onnx.py``'s exit code and its ``error:`` lines, run in this process."""
    from expand_mm.cli import run_tool
    from wrapper_test_utils import load_tool
    tool = load_tool('export_onnx')
    argv, sys.argv = sys.argv, ['export_onnx.py', str(config), str(checkpoint), str(out)]
    try:
        code = run_tool(tool.main)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith('error: ')]


def _poisoned(model, key: str, value: float, path) -> str:
    """Save ``model``'s weights with one entry of ``key`` set to ``value``."""
    from wrapper_test_utils import save_state
    with torch.no_grad():
        model.state_dict()[key].view(-1)[0] = value
    return save_state(model, path)


def test_export_refuses_non_finite_weights_and_outputs_naming_them(tmp_path, capsys):
    """A NaN in a factor, an Inf in a BatchNorm statistic, and finite weights whose output
    overflows: each ends in one error line naming the tensor, and no ONNX file."""
    import expand_mm
    from wrapper_test_utils import DET_COMPACT, ROOT as REPO, build_model
    expandnet = REPO / ('projects/digits/configs/digits/'
                        'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
    torch.manual_seed(0)
    factor = next(f'{path}.{name}' for path, layer in expand_mm.expanded_layers(
        build_model(expandnet)) for name, _ in layer.named_parameters())
    compact = build_model(DET_COMPACT)
    bn_var = next(k for k in compact.state_dict() if k.endswith('running_var'))
    head = [k for k, v in compact.state_dict().items()
            if k.startswith('bbox_head') and k.endswith('weight') and v.dim() == 4][-1]
    cases = [(expandnet, _poisoned(build_model(expandnet), factor, float('nan'),
                                   tmp_path / 'nan.pth'), factor),
             (DET_COMPACT, _poisoned(build_model(DET_COMPACT), bn_var, float('inf'),
                                     tmp_path / 'inf.pth'), bn_var)]
    huge = build_model(DET_COMPACT)
    with torch.no_grad():
        huge.state_dict()[head].fill_(3e38)  # finite, but the sums overflow
    from wrapper_test_utils import save_state
    cases.append((DET_COMPACT, save_state(huge, tmp_path / 'huge.pth'), 'output['))
    for config, ckpt, named in cases:
        out = tmp_path / 'model.onnx'
        code, errors = _export_in_process(config, ckpt, out, capsys)
        assert code == 2 and len(errors) == 1, (ckpt, errors)
        assert 'NaN or Inf' in errors[0] and named in errors[0], errors
        assert not out.exists()
