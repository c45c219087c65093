"""Knowledge distillation (``type='Distiller'``) and the wrapper protocol of the checkpoints.

Real Runner runs of the configs in ``projects/digits/configs/distill`` on tiny generated
digits data: the KD losses are logged and non-zero, the teacher stays frozen,
and the compact checkpoint holds only the (contracted) student, loads strictly
into the stock compact config and computes what the student computes.
"""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn

import expand_mm
from expand_mm.deploy import contract_state_dict, deployable_state_dict
from expand_mm.models import find_deployable
from expand_mm.hooks import ContractCheckpointHook, ExpandCheckpointLoadHook
from expand_mm.models import FeatureImitationLoss, LogitsKDLoss
from wrapper_test_utils import (DET_COMPACT, ROOT, SEG_COMPACT, assert_outputs_close,
                                assert_same_raw_outputs, build_model, compact_checkpoint,
                                load_stock, load_tool, logged, save_state, tiny_cfg)

DISTILL = ROOT / 'projects/digits/configs/distill'
KD_DET = DISTILL / 'kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
KD_SEG = DISTILL / ('kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_'
                    'digits-seg-64x64.py')
KD_SEG_COMPACT = DISTILL / 'kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
TEACHER_DET = DISTILL / 'yolo-lite-w2_1xb16-900i_digits-det-64x64.py'
TEACHER_SEG = DISTILL / 'unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py'


@pytest.fixture(scope='module')
def data(digits_data):
    return digits_data


def teacher_checkpoint(config, path) -> str:
    """A checkpoint of a freshly initialised teacher (what matters is that it is fixed)."""
    torch.manual_seed(1)
    with DefaultScope.overwrite_default_scope('mmdet' if 'det' in config.name else 'mmseg'):
        teacher = build_model(config)
        teacher.init_weights()
    return save_state(teacher, path)


def keep_all_boxes(model: nn.Module) -> None:
    """Zero the score thresholds of a YOLOv3 head: compare every box, not none."""
    model.bbox_head.test_cfg.score_thr = 0.0
    model.bbox_head.test_cfg.conf_thr = 0.0


def assert_teacher_frozen(model, teacher_ckpt: str) -> None:
    saved = torch.load(teacher_ckpt)['state_dict']
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, saved[key]), f'teacher.{key} changed'
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training


@pytest.mark.slow
def test_det_kd_of_an_expandnet_trains_and_deploys_the_student(data, tmp_path):
    teacher_ckpt = teacher_checkpoint(TEACHER_DET, tmp_path / 'teacher.pth')
    work = tmp_path / 'work'
    cfg = tiny_cfg(KD_DET, data, work, 'det')
    cfg.model.teacher_ckpt = teacher_ckpt
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    model = runner.model
    assert type(model).__name__ == 'Distiller'
    assert expand_mm.expanded_layers(model.student)
    assert logged(runner, 'loss_kd') > 0 and logged(runner, 'loss_feat') > 0
    assert logged(runner, 'loss') > logged(runner, 'loss_kd') + logged(runner, 'loss_feat')
    assert_teacher_frozen(model, teacher_ckpt)
    # The adapters are trained (the optimizer has seen their gradients; the
    # step itself clears .grad).
    optimizer = runner.optim_wrapper.optimizer
    for p in model.distill_losses[1].adapters.parameters():
        assert p.requires_grad and optimizer.state[p]['exp_avg'].abs().sum() > 0

    # The compact checkpoint: the contracted student only, stock keys and shapes ...
    compact = compact_checkpoint(work)
    assert not any(k.startswith(('student.', 'teacher.', 'distill_losses.')) for k in compact)
    stock = load_stock(DET_COMPACT, compact)
    # ... which computes what the trained student computes, and predicts the same.
    assert_same_raw_outputs(stock, model, model.student)
    keep_all_boxes(stock)
    keep_all_boxes(model.student)
    batch = next(iter(runner.train_dataloader))
    from test_integration import assert_same_detections
    with torch.no_grad():
        a, b = stock.val_step(batch), model.val_step(batch)
    for da, db in zip(a, b):
        assert_same_detections(da.pred_instances, db.pred_instances)
    # Every trainable parameter gets a gradient in a step, as the config's
    # ExpandNetDistributedDataParallel (find_unused_parameters=False) needs.
    # (On a copy: the step updates BN statistics.)
    assert cfg.model_wrapper_cfg == dict(type='ExpandNetDistributedDataParallel')
    probe = copy.deepcopy(model)
    losses = probe(**probe.data_preprocessor(batch, True), mode='loss')
    probe.parse_losses(losses)[0].backward()
    assert not [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]

    # tools/contract.py writes the same compact checkpoint from the training one.
    cfg_path = tmp_path / 'kd.py'
    cfg.dump(str(cfg_path))
    out = tmp_path / 'contracted.pth'
    contract = load_tool('contract')
    argv = sys.argv
    sys.argv = ['contract.py', str(cfg_path), str(work / 'iter_2.pth'), str(out), '--verify',
                '--img-size', '64', '64']
    try:
        assert contract.main() == 0
    finally:
        sys.argv = argv
    by_tool = torch.load(out)['state_dict']
    assert set(by_tool) == set(compact)
    for key in compact:
        torch.testing.assert_close(by_tool[key], compact[key])

    # load_from= a compact checkpoint starts the student from it (the teacher keeps its own).
    cfg2 = copy.deepcopy(cfg)
    cfg2.work_dir = str(tmp_path / 'work2')
    runner2 = Runner.from_cfg(cfg2)
    teacher_before = copy.deepcopy(runner2.model.teacher.state_dict())
    runner2.load_checkpoint(str(work / 'iter_2_compact.pth'))
    # the teacher's own (unloaded) entries completing the checkpoint are no teacher weights
    assert not runner2.model.teacher_loaded
    loaded = expand_mm.contract_model(runner2.model.student).state_dict()
    for key in compact:
        torch.testing.assert_close(loaded[key], compact[key], rtol=1e-4,
                                   atol=1e-4 * float(compact[key].abs().max() + 1e-12))
    for key, value in runner2.model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    # the distiller's own training checkpoint does carry the teacher's weights
    runner2.load_checkpoint(str(work / 'iter_2.pth'))
    assert runner2.model.teacher_loaded


@pytest.mark.slow
@pytest.mark.parametrize('config, expanded', [(KD_SEG, True), (KD_SEG_COMPACT, False)],
                         ids=['expandnet-student', 'compact-student'])
def test_seg_kd_trains_and_deploys_the_student(data, tmp_path, config, expanded):
    teacher_ckpt = teacher_checkpoint(TEACHER_SEG, tmp_path / 'teacher.pth')
    work = tmp_path / 'work'
    cfg = tiny_cfg(config, data, work, 'seg')
    cfg.model.teacher_ckpt = teacher_ckpt
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    assert bool(expand_mm.expanded_layers(model.student)) == expanded
    assert logged(runner, 'loss_kd') > 0
    assert_teacher_frozen(model, teacher_ckpt)

    compact = compact_checkpoint(work)
    stock = load_stock(SEG_COMPACT, compact)
    assert_same_raw_outputs(stock, model)
    with torch.no_grad():
        batch = next(iter(runner.train_dataloader))
        a, b = stock.val_step(batch), model.val_step(batch)
    for da, db in zip(a, b):
        assert_outputs_close(da.seg_logits.data, db.seg_logits.data)


def test_kd_train_step_defers_the_students_factor_grads_with_the_same_gradients(
        data, tmp_path, monkeypatch):
    """The Distiller's train_step runs an ExpandNet student's factor gradients through the
    deferred path (composition backward after the main pass), and every parameter gets
    what plain autograd gives it."""
    from mmengine.optim import OptimWrapper
    from expand_mm.layers import base
    from expand_mm.models import deferring_expandnet
    teacher_ckpt = teacher_checkpoint(TEACHER_SEG, tmp_path / 'teacher.pth')
    cfg = tiny_cfg(KD_SEG, data, tmp_path / 'work', 'seg')
    cfg.model.teacher_ckpt = teacher_ckpt
    runner = Runner.from_cfg(cfg)
    model = runner.model
    model.init_weights()
    model.train()
    for head in (model.student.decode_head, model.student.auxiliary_head):
        head.dropout = None  # both passes below must compute the same function
    assert deferring_expandnet(model) is model.student
    batch = next(iter(runner.train_dataloader))
    layers = [layer for _, layer in expand_mm.expanded_layers(model.student)]

    deferred = []  # one entry per composed weight whose backward waited for the flush
    leaf_ready = base._DEFERRED_GRADS.leaf_ready

    def counting_leaf_ready(layer, *args):
        deferred.append(layer)
        leaf_ready(layer, *args)

    monkeypatch.setattr(base._DEFERRED_GRADS, 'leaf_ready', counting_leaf_ready)
    got = {}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    handles = [p.register_post_accumulate_grad_hook(
        lambda t, name=name: got.__setitem__(name, t.grad.clone())) for name, p in trainable]
    model.train_step(batch, OptimWrapper(torch.optim.SGD([p for _, p in trainable], lr=0.0)))
    for handle in handles:
        handle.remove()
    assert not any(layer.defer_factor_grads for layer in layers)  # switched off after

    model.zero_grad(set_to_none=True)
    losses = model.loss(**model.data_preprocessor(batch, True))
    model.parse_losses(losses)[0].backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # Every layer that feeds a loss went through the deferred path (the full-resolution
    # decoder stage feeds no head: its layers, and their factors, get nothing).
    used = {id(layer) for layer in layers
            if any(p.grad is not None for p in layer.sublayers.parameters())}
    assert len(used) > len(layers) // 2 and {id(layer) for layer in deferred} == used
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5,
                                   atol=1e-5 * float(want[name].abs().max()), msg=name)


def test_teacher_checkpoint_of_another_model_is_refused(tmp_path):
    # A checkpoint of the compact student (half the teacher's width) as the teacher's.
    with DefaultScope.overwrite_default_scope('mmdet'):
        wrong = save_state(build_model(DET_COMPACT), tmp_path / 'student.pth')
        distiller = build_model(KD_DET, teacher_ckpt=wrong)
        with pytest.raises(expand_mm.CheckpointError) as err:
            distiller.init_weights()
    message = str(err.value)
    assert 'model.teacher_ckpt' in message and 'student.pth' in message
    assert 'wrong shape' in message and 'backbone' in message
    with pytest.raises(RuntimeError, match='teacher has no weights'):
        distiller.loss(torch.zeros(1, 3, 64, 64), [])


def test_missing_teacher_checkpoint_and_misspelled_options_say_what_to_do(tmp_path):
    with DefaultScope.overwrite_default_scope('mmdet'):
        distiller = build_model(KD_DET, teacher_ckpt=str(tmp_path / 'not_trained_yet.pth'))
        with pytest.raises(expand_mm.CheckpointError,
                           match=r"model.teacher_ckpt=.*not_trained_yet.pth' does not exist: "
                                 r"train the teacher config first \(python tools/train.py "
                                 r".*yolo-lite-w2_1xb16-900i_digits-det-64x64.py\)"):
            distiller.init_weights()
        # Passed on to the student, a typo used to fail in YOLOV3.__init__.
        with pytest.raises(ValueError, match=r"Distiller: unknown option\(s\) \['distill_loss'\]"
                                             r". 'distill_loss': did you mean 'distill_losses'"):
            build_model(KD_DET, distill_loss=[])


def test_teacher_with_another_preprocessing_is_refused():
    # The teacher runs on the student's preprocessed batch: another channel order
    # (or mean / std) would silently feed it inputs it was not trained on.
    teacher = Config.fromfile(str(TEACHER_DET))
    model = teacher.model.copy()
    model['data_preprocessor'] = dict(teacher.data_preprocessor, bgr_to_rgb=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError, match='channel order'):
            build_model(KD_DET, teacher=model)
        model['data_preprocessor'] = dict(teacher.data_preprocessor, mean=[0.0, 0.0, 0.0])
        with pytest.raises(ValueError, match=r'data_preprocessor\.mean'):
            build_model(KD_DET, teacher=model)


def test_distillation_losses_refuse_mismatched_shapes():
    kd = LogitsKDLoss(student='decode_head', activation='softmax')
    with pytest.raises(ValueError) as err:
        kd(torch.zeros(2, 11, 8, 8), torch.zeros(2, 10, 8, 8))
    assert '(2, 11, 8, 8)' in str(err.value) and '(2, 10, 8, 8)' in str(err.value)
    assert 'loss_kd' in str(err.value)
    resized = LogitsKDLoss(student='decode_head', resize=True)
    assert resized(torch.zeros(2, 11, 8, 8), torch.zeros(2, 11, 16, 16)) == 0
    feat = FeatureImitationLoss(student='neck', student_channels=[4], teacher_channels=[8])
    with pytest.raises(ValueError, match=r'\(1, 8, 4, 4\).*\(1, 8, 2, 2\)'):
        feat([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 8, 2, 2)])
    with pytest.raises(ValueError, match='student_channels'):
        feat([torch.zeros(1, 3, 4, 4)], [torch.zeros(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"teacher 'neck' outputs \[\(1, 6, 4, 4\)\] but "
                                         r"teacher_channels=\[8\]"):
        feat([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 6, 4, 4)])
    # group_size=0 was read as one group of all channels; a string weight failed in float().
    with pytest.raises(ValueError, match=r'group_size=0 must be a positive int'):
        LogitsKDLoss(student='x', group_size=0)
    with pytest.raises(ValueError, match=r"LogitsKDLoss: loss_weight='x' must be a number"):
        LogitsKDLoss(student='x', loss_weight='x')


def test_logits_kd_values():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    kd = LogitsKDLoss(student='x', activation='softmax', temperature=2.0)
    assert float(kd(s, s)) == pytest.approx(0.0, abs=1e-6)
    log_ps = torch.log_softmax(s / 2, 1)
    log_pt = torch.log_softmax(t / 2, 1)
    expected = 4 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
    torch.testing.assert_close(kd(s, t), expected)
    # sigmoid: BCE against the teacher's probabilities, minus its entropy, on the
    # selected channels of each group only (here 2..4 of groups of 5).
    sig = LogitsKDLoss(student='x', activation='sigmoid', group_size=5, channels=(2, 5),
                       reduction='sum')
    t2 = t.clone()
    t2[:, :2] = 10.0  # outside the selected channels: no effect
    assert float(sig(s, s)) == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(sig(s, t), sig(s, t2))
    pt = torch.sigmoid(t[:, 2:])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(s[:, 2:], pt, reduction='sum') - bce(t[:, 2:], pt, reduction='sum'))
    torch.testing.assert_close(sig(s, t), expected, rtol=1e-4, atol=1e-4)
    # a nested head output ((level0, level1),) is flattened
    assert float(sig(((s, s),), ((t, t),))) == pytest.approx(2 * float(sig(s, t)), rel=1e-5)
    # T^2-scaled Bernoulli KL of the softened logits; 'mean' over the selected
    # elements, 'batchmean' over the batch.
    per_elem = (bce(s[:, 2:] / 3, torch.sigmoid(t[:, 2:] / 3), reduction='none')
                - bce(t[:, 2:] / 3, torch.sigmoid(t[:, 2:] / 3), reduction='none'))
    for reduction, expected in (('mean', per_elem.mean()), ('batchmean', per_elem.sum() / 2)):
        hot = LogitsKDLoss(student='x', activation='sigmoid', temperature=3.0, group_size=5,
                           channels=(2, 5), reduction=reduction, loss_weight=0.5)
        torch.testing.assert_close(hot(s, t), 0.5 * 9 * expected, rtol=1e-4, atol=1e-6)


class _Wrapper(nn.Module):
    """A minimal wrapper following the protocol, for the checkpoint helpers."""

    def __init__(self, inner: nn.Module, outside: bool = False) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)
        self.part = nn.Sequential(inner) if not outside else nn.Sequential()
        self._outside = [inner] if outside else []  # a list: not registered as a submodule

    def deployable_model(self) -> nn.Module:
        return self._outside[0] if self._outside else self.part[0]


def test_wrapper_protocol_for_checkpoints():
    with DefaultScope.overwrite_default_scope('mmdet'):
        compact = build_model(DET_COMPACT)
    compact.init_weights()
    wrapper = _Wrapper(compact)
    module, prefix = find_deployable(wrapper)
    assert module is compact and prefix == 'part.0.'
    state = wrapper.state_dict()
    selected = deployable_state_dict(wrapper, {'module.' + k: v for k, v in state.items()})
    assert set(selected) == set(compact.state_dict())
    # No expanded layer in the deployable part: its entries as they are.
    out, errors = contract_state_dict(wrapper, state)
    assert errors is None and set(out) == set(compact.state_dict())
    assert all(torch.equal(out[k], v) for k, v in compact.state_dict().items())
    # ... but a plain model alone has nothing to contract.
    with pytest.raises(ValueError, match='nothing to contract'):
        contract_state_dict(compact, compact.state_dict())
    with pytest.raises(expand_mm.CheckpointError, match="under 'part.0.'"):
        deployable_state_dict(wrapper, {'extra.weight': torch.zeros(2, 2)})
    with pytest.raises(ValueError, match='not a submodule'):
        find_deployable(_Wrapper(nn.Linear(1, 1), outside=True))

    # ContractCheckpointHook accepts the wrapper, refuses the plain model.
    def fake_runner(model):
        return SimpleNamespace(model=model, logger=MMLogger.get_current_instance(),
                               cfg=Config(dict()), optim_wrapper=None, param_schedulers=None,
                               message_hub=SimpleNamespace(runtime_info={}))
    ContractCheckpointHook().before_train(fake_runner(wrapper))
    with pytest.raises(ValueError, match='no expanded layer'):
        ContractCheckpointHook().before_train(fake_runner(compact))


def test_load_hook_loads_a_deployable_checkpoint_into_the_wrapper():
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        compact, other = build_model(DET_COMPACT), build_model(DET_COMPACT)
    other.init_weights()
    wrapper = _Wrapper(compact)
    extra_before = wrapper.extra.weight.detach().clone()
    runner = SimpleNamespace(model=wrapper, _load_from='other.pth', _resume=False,
                             logger=MMLogger.get_current_instance())
    checkpoint = {'state_dict': copy.deepcopy(other.state_dict())}
    ExpandCheckpointLoadHook().after_load_checkpoint(runner, checkpoint)
    assert set(checkpoint['state_dict']) == set(wrapper.state_dict())
    wrapper.load_state_dict(checkpoint['state_dict'], strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(compact.state_dict()[key], value), key
    assert torch.equal(wrapper.extra.weight, extra_before)
    # The wrapper's own checkpoint is left as it is, and is logged as the wrapper's.
    own = {'state_dict': wrapper.state_dict()}
    logged = []
    ExpandCheckpointLoadHook().after_load_checkpoint(
        SimpleNamespace(model=wrapper, _load_from='own.pth', _resume=False,
                        logger=SimpleNamespace(info=logged.append)), own)
    assert own['state_dict'].keys() == wrapper.state_dict().keys()
    assert logged == ["ExpandCheckpointLoadHook: own.pth is a checkpoint of the _Wrapper that "
                      'is trained, its deployable part a compact one']
    # Resuming from the deployable part alone, or loading another model, is refused.
    runner._resume = True
    with pytest.raises(expand_mm.CheckpointError, match='nothing to resume'):
        ExpandCheckpointLoadHook().after_load_checkpoint(
            runner, {'state_dict': other.state_dict()})
    runner._resume = False
    with pytest.raises(expand_mm.CheckpointError, match='fits neither'):
        ExpandCheckpointLoadHook().after_load_checkpoint(
            runner, {'state_dict': {'backbone.conv1.weight': torch.zeros(8, 3, 3, 3)}})


@pytest.mark.slow
def test_resume_needs_no_teacher_file(data, tmp_path):
    """The distiller checkpoint holds the teacher: resuming works after the teacher's own
    file is gone, with the teacher as saved; a fresh run still says the file is missing."""
    teacher_ckpt = teacher_checkpoint(TEACHER_DET, tmp_path / 'teacher.pth')
    work = tmp_path / 'work'
    cfg = tiny_cfg(DISTILL / 'kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py', data,
                   work, 'det', max_iters=1)
    cfg.model.teacher_ckpt = teacher_ckpt
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    saved_teacher = torch.load(teacher_ckpt)['state_dict']
    (tmp_path / 'teacher.pth').unlink()

    resumed = copy.deepcopy(cfg)
    resumed.train_cfg.max_iters = 2
    resumed.resume = True
    runner = Runner.from_cfg(resumed)
    runner.train()
    assert runner.iter == 2 and (work / 'iter_2.pth').is_file()
    for key, value in runner.model.teacher.state_dict().items():
        assert torch.equal(value, saved_teacher[key]), key

    fresh = copy.deepcopy(cfg)
    fresh.work_dir = str(tmp_path / 'empty')  # resume=True, but nothing to resume from
    fresh.resume = True
    with pytest.raises(expand_mm.CheckpointError,
                       match=r"teacher.pth' does not exist: train the teacher config first") \
            as err:
        Runner.from_cfg(fresh).train()
    assert 'resumed' not in str(err.value)
