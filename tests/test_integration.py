"""Every ExpandNet config trains through the stock Runner, saves, resumes, and
yields a compact checkpoint that the stock mmdet / mmseg clients load and that
predicts what the expanded model predicts."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner

import expand_mm
from data_factory import make_coco
from mm_test_utils import dataset_types, load_config, shrink_for_test

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
EXPANDNET_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'expandnet', '*.py')))
COCO_NAMES = ('person', 'bicycle', 'car')

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> str:
    """A COCO tree (train2017 and val2017, 4 images of 96x96 each) of three COCO classes."""
    root = tmp_path_factory.mktemp('coco')
    for split in ('train2017', 'val2017'):
        make_coco(str(root), num_images=4, size=96, split=split, class_names=COCO_NAMES)
    return f'{root}/'


def tiny_data(cfg, request) -> tuple[str, tuple[int, int]]:
    """(data_root, image size) of the tiny dataset in the config's format."""
    types = dataset_types(cfg)
    if 'CocoDataset' in types:
        return request.getfixturevalue('coco_root'), (96, 96)
    if 'VOCDataset' in types:
        return request.getfixturevalue('voc_root'), (96, 96)
    if 'CityscapesDataset' in types:
        return request.getfixturevalue('cityscapes_root'), (64, 128)
    raise AssertionError(f'no tiny-data factory for {types}')


def sample_image(cfg, data_root: str) -> str:
    """Path of one image of the tiny dataset."""
    patterns = ['val2017/*.png', 'VOC2007/JPEGImages/*.jpg', 'leftImg8bit/val/city/*.png']
    return sorted(p for pat in patterns for p in glob.glob(osp.join(data_root, pat)))[0]


def keep_all_detections(model_cfg) -> None:
    """Zero the score thresholds of a detector config (in place)."""
    if isinstance(model_cfg, dict):
        for key in ('score_thr', 'conf_thr'):
            if key in model_cfg:
                model_cfg[key] = 0.0
        for value in model_cfg.values():
            keep_all_detections(value)


def assert_same_detections(a, b, top: int = 20, box_rtol: float = 1e-5) -> None:
    """Each of ``a``'s best boxes is in ``b`` with the same label, box (to ``box_rtol`` of
    its coordinates) and score."""
    assert len(a) > 0 and abs(len(a) - len(b)) <= 1
    scale = float(a.scores.max())
    for i in torch.argsort(a.scores, descending=True)[:top]:
        # Relative to the coordinates: an untrained YOLOX decodes exp() of raw
        # offsets into huge (even infinite) boxes, equal in both models.
        box = a.bboxes[i]
        near = ((b.bboxes == box) | ((b.bboxes - box).abs() < 1e-2 + box_rtol * box.abs()))
        same = ((b.labels == a.labels[i]) & near.all(dim=1)
                & ((b.scores - a.scores[i]).abs() <= 1e-4 * scale + 1e-6))
        assert same.any(), f'box {a.bboxes[i].tolist()} score {float(a.scores[i])} not found'


@pytest.mark.parametrize('config', EXPANDNET_CONFIGS, ids=osp.basename)
def test_train_resume_contract_and_stock_inference(config, tmp_path, request):
    cfg = load_config(config)
    data_root, size = tiny_data(cfg, request)
    work = str(tmp_path / 'work')
    shrink_for_test(cfg, work, data_root, size, max_iters=2)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert expand_mm.expanded_layers(runner.model), 'the model trained was not expanded'
    for name in ('iter_2.pth', 'iter_2_compact.pth'):
        assert osp.isfile(osp.join(work, name)), name

    # Resume: continues from iteration 2 with the same factors and optimizer state.
    cfg = load_config(config)
    shrink_for_test(cfg, work, data_root, size, max_iters=3)
    cfg.default_hooks.checkpoint.interval = 1
    cfg.resume = True
    cfg.load_from = osp.join(work, 'iter_2.pth')
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 3
    saved = torch.load(osp.join(work, 'iter_3.pth'))
    assert saved['message_hub']['log_scalars']['train/loss'].data[0].shape[0] == 3

    # The compact checkpoint loads strictly into the stock compact config ...
    compact_cfg = load_config(config)
    shrink_for_test(compact_cfg, work, data_root, size)
    compact_cfg.model = expand_mm.models.compact_model_cfg(compact_cfg.model)
    compact_ckpt = osp.join(work, 'iter_3_compact.pth')
    state = torch.load(compact_ckpt)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        stock = MODELS.build(compact_cfg.model)
    stock.load_state_dict(state['state_dict'], strict=True)

    # ... and the stock inference API predicts what the expanded model predicts.
    expanded_cfg = load_config(config)
    shrink_for_test(expanded_cfg, work, data_root, size)
    for c in (compact_cfg, expanded_cfg):  # keep every box: an untrained model scores low
        keep_all_detections(c.model)
    image = sample_image(cfg, data_root)
    if cfg.default_scope == 'mmdet':
        from mmdet.apis import inference_detector, init_detector
        deployed = init_detector(compact_cfg, compact_ckpt, device='cpu')
        trained = init_detector(expanded_cfg, osp.join(work, 'iter_3.pth'), device='cpu',
                                cfg_options={})
        assert not expand_mm.expanded_layers(deployed)
        assert expand_mm.expanded_layers(trained)
        a = inference_detector(deployed, image).pred_instances
        b = inference_detector(trained, image).pred_instances
        assert_same_detections(a, b)
    else:
        from mmseg.apis import inference_model, init_model
        deployed = init_model(compact_cfg, compact_ckpt, device='cpu')
        trained = init_model(expanded_cfg, osp.join(work, 'iter_3.pth'), device='cpu')
        assert not expand_mm.expanded_layers(deployed)
        assert expand_mm.expanded_layers(trained)
        a, b = inference_model(deployed, image), inference_model(trained, image)
        logits_a, logits_b = a.seg_logits.data, b.seg_logits.data
        torch.testing.assert_close(logits_a, logits_b, rtol=1e-4,
                                   atol=1e-4 * float(logits_a.abs().max()))
        agree = (a.pred_sem_seg.data == b.pred_sem_seg.data).float().mean()
        assert agree > 0.999
