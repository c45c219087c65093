"""expand_mm.apis.init_compact_model: the deployed model of any config in one call."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import expand_mm
from expand_mm.apis import compact_config, init_compact_model
from wrapper_test_utils import ROOT

COMPACT = ROOT / 'configs/yolo_lite/yolo-lite_8xb16-100e_voc0712.py'
EXPANDNET = ROOT / 'configs/expandnet/expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py'
SEG_EXPANDNET = ROOT / ('projects/digits/configs/digits/'
                        'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py')


def _trained(config, path, meta=None):
    """An ExpandNet of ``config`` with fresh weights, saved as a training checkpoint."""
    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model).eval()
    torch.save({'state_dict': model.state_dict(), 'meta': meta or {}}, path)
    return model


def _assert_same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a(x, mode='tensor'), b(x, mode='tensor')
    flat_a = [t for t in (out_a[0] if isinstance(out_a, tuple) else [out_a])]
    flat_b = [t for t in (out_b[0] if isinstance(out_b, tuple) else [out_b])]
    assert len(flat_a) == len(flat_b)
    for ta, tb in zip(flat_a, flat_b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-4 * float(tb.abs().max()))


def test_init_compact_model_takes_a_training_or_a_compact_checkpoint_of_an_expandnet(tmp_path):
    classes = ('a', 'b')
    trained = _trained(EXPANDNET, tmp_path / 'iter_1.pth',
                       meta={'dataset_meta': {'classes': classes}})
    deployed = init_compact_model(str(EXPANDNET), str(tmp_path / 'iter_1.pth'), device='cpu')
    assert type(deployed).__name__ == 'YOLOV3' and not expand_mm.expanded_layers(deployed)
    assert deployed.dataset_meta['classes'] == classes  # the stock init_detector's meta
    assert deployed.cfg.model.type == 'YOLOV3'  # the config it keeps is the compact one
    x = torch.rand(1, 3, 64, 64)
    _assert_same_outputs(deployed, trained, x)
    # its compact checkpoint, with the ExpandNet or the compact config: the same model
    compact = tmp_path / 'iter_1_compact.pth'
    torch.save({'state_dict': deployed.state_dict(), 'meta': {}}, compact)
    for config in (EXPANDNET, COMPACT):
        _assert_same_outputs(init_compact_model(config, str(compact), device='cpu'), trained, x)


def test_init_compact_model_names_the_compact_twin_of_a_training_checkpoint(tmp_path):
    _trained(EXPANDNET, tmp_path / 'iter_1.pth')
    with pytest.raises(expand_mm.CheckpointError,
                       match=r'It is an ExpandNet training checkpoint .* use its \*_compact.pth'):
        init_compact_model(str(COMPACT), str(tmp_path / 'iter_1.pth'), device='cpu')


def test_init_compact_model_runs_mmseg_init_model(tmp_path):
    trained = _trained(SEG_EXPANDNET, tmp_path / 'iter_1.pth')
    deployed = init_compact_model(SEG_EXPANDNET, str(tmp_path / 'iter_1.pth'), device='cpu')
    assert type(deployed).__name__ == 'EncoderDecoder'
    assert not expand_mm.expanded_layers(deployed)
    _assert_same_outputs(deployed, trained, torch.rand(1, 3, 64, 64))


def test_compact_config_unwraps_a_distiller_and_drops_expand_mm_hooks():
    kd = ROOT / ('projects/digits/configs/distill/'
                 'kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
    plant = ROOT / ('projects/digits/configs/planting/'
                    'plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py')
    student = ROOT / 'projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py'
    for config in (kd, plant):
        cfg = compact_config(config)
        assert cfg.model.to_dict() == Config.fromfile(str(student)).model.to_dict()
        hooks = [*cfg.default_hooks.values(), *cfg.get('custom_hooks', [])]
        assert not [h for h in hooks if h['type'] in expand_mm.apis.TRAINING_FORM_HOOKS]
        assert cfg.default_hooks.checkpoint.type == 'SafeCheckpointHook'  # serves any model
