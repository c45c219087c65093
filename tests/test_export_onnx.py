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
