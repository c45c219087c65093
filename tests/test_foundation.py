"""The environment: pinned stack, compiled mmcv ops, stock models, safe checkpoint loading."""
import os.path as osp
import pickle

import pytest
import torch

import expand_mm  # noqa: F401  (allowlists mmengine's checkpoint types)
from stock_models import STOCK_CONFIGS


def test_pinned_stack():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    import torchvision
    assert torch.__version__.split('+')[0] == '2.14.1'
    assert torchvision.__version__.split('+')[0] == '0.29.1'
    assert (mmengine.__version__, mmcv.__version__, mmdet.__version__, mmseg.__version__) == \
        ('0.10.7', '2.1.0', '3.3.0', '1.2.2')


def test_mmcv_compiled_nms_suppresses_overlaps():
    from mmcv.ops import nms
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert dets.shape == (2, 5)
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.7])


@pytest.mark.parametrize('name', sorted(STOCK_CONFIGS))
def test_stock_model_builds_and_runs_on_cpu(name, stock_model):
    model = stock_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), mode='tensor')
    tensors = [t for level in (out if isinstance(out, (tuple, list)) else [out])
               for t in (level if isinstance(level, (tuple, list)) else [level])]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    if name.startswith(('unet', 'fcn')):
        assert out.shape[:2] == (1, 19)  # Cityscapes classes


class NotAllowed:
    """An arbitrary class: unpickling it must stay forbidden."""

    def __reduce__(self):
        return (print, ('this must never run',))


def test_safe_loading_still_refuses_arbitrary_objects(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'payload': NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(path, map_location='cpu')


@pytest.mark.slow
def test_runner_trains_saves_and_resumes(tmp_path):
    """mmengine's own resume works on torch >= 2.6 with safe loading left on."""
    from data_factory import make_coco
    from mmengine.config import Config
    from mmengine.runner import Runner
    make_coco(str(tmp_path / 'coco'), num_images=4, split='train')
    cfg_path = tmp_path / 'cfg.py'
    cfg_path.write_text(f"""
_base_ = 'mmdet::yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py'
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=3))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(times=1, dataset=dict(data_root='{tmp_path}/coco/',
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
        metainfo=dict(classes=('class0', 'class1', 'class2')))))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=2, val_interval=100)
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
param_scheduler = []
default_hooks = dict(checkpoint=dict(interval=1, by_epoch=False), logger=dict(interval=1))
log_processor = dict(by_epoch=False)
""")
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    runner.train()
    ckpt = osp.join(cfg.work_dir, 'iter_2.pth')
    assert osp.isfile(ckpt)
    trained = {k: v.clone() for k, v in runner.model.state_dict().items()}

    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.train_cfg.max_iters = 3
    cfg.resume = True
    cfg.load_from = ckpt
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 3
    state = torch.load(ckpt)  # safe loading (weights_only=True) reads mmengine's checkpoint
    assert state['meta']['iter'] == 2
    for key, value in state['state_dict'].items():
        torch.testing.assert_close(value, trained[key])
    # The resumed run continued the old one: its loss history holds all 3 iterations.
    last = torch.load(osp.join(cfg.work_dir, 'iter_3.pth'))
    assert last['meta']['iter'] == 3
    assert last['message_hub']['log_scalars']['train/loss'].data[0].shape[0] == 3
