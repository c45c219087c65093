"""The hierarchical auxiliary network (``type='AuxHierarchy'``) and its structure search.

A wider training-only network A reads the compact network C at several
levels; C computes what it computes alone, the gates of the C -> A
connections learn during the search phase and are made discrete into a
structure that rebuilds the same network, a run resumed mid-search goes on
searching, and the compact checkpoint is C alone.
"""
from __future__ import annotations

import copy

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner

import expand_mm
from expand_mm.errors import ConfigError
from expand_mm.models import AuxHierarchy
from wrapper_test_utils import (DET_COMPACT, ROOT, SEG_COMPACT, assert_same_raw_outputs,
                                build_model, compact_checkpoint, load_config, load_stock, logged,
                                tiny_cfg)

AUX = ROOT / 'projects/digits/configs/aux'
SEARCH_DET = AUX / 'auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64.py'
FIXED_DET = AUX / 'auxh-w2-fixed_yolo-lite_1xb16-900i_digits-det-64x64.py'
SEARCH_SEG = AUX / 'auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
DET_LEVELS = ['backbone[0]', 'backbone[1]', 'backbone[2]', 'neck[0]', 'neck[1]', 'neck[2]']


def aux_model(config=SEARCH_DET, **overrides) -> AuxHierarchy:
    """The config's AuxHierarchy, built in its scope, initialised, in training mode."""
    torch.manual_seed(0)
    model = build_model(config, **overrides)
    model.init_weights()
    return model.train()


def a_batch(model, data, task: str = 'det') -> dict:
    """One preprocessed training batch of the tiny digits set."""
    config = SEARCH_DET if task == 'det' else SEARCH_SEG
    cfg = tiny_cfg(config, data, data / 'unused', task)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        loader = Runner.build_dataloader(cfg.train_dataloader)
    return model.data_preprocessor(next(iter(loader)), True)


def at_iteration(it: int, max_iters: int = 10) -> None:
    """Set the runner's iteration as MMEngine's RuntimeInfoHook does."""
    hub = MessageHub.get_current_instance()
    hub.update_info('iter', it)
    hub.update_info('max_iters', max_iters)


def aux_losses(losses: dict, prefix: str = 'auxnet.') -> dict:
    return {k: v for k, v in losses.items() if k.startswith(prefix)}


def total(model, losses: dict) -> torch.Tensor:
    return model.parse_losses(losses)[0]


# ------------------------------------------------------------------------- levels

def test_levels_follow_the_compact_network():
    model = aux_model()
    assert [lv.name for lv in model.levels] == DET_LEVELS
    assert [lv.channels for lv in model.levels] == [64, 128, 128, 64, 32, 32]
    assert model.head_levels == [3, 4, 5]  # the neck's maps feed the head
    # A is width_mult times wider at every level, its head too (inputs included).
    assert [b.conv.conv.out_channels for b in model.blocks] == [128, 256, 256, 128, 64, 64]
    assert list(model.aux_head.in_channels) == [128, 64, 64]
    assert list(model.aux_head.out_channels) == [256, 128, 128]


def test_segmentor_levels_include_encoder_stages():
    model = aux_model(SEARCH_SEG)
    names = [lv.name for lv in model.levels]
    assert names == ['backbone.encoder.1', 'backbone.encoder.2', 'backbone[0]', 'backbone[1]',
                     'backbone[2]']
    assert model.head_levels == [4] and model.head_slots == [2]  # FCN head, in_index=2


@pytest.mark.parametrize('option, value, message', [
    ('structure', ['backbone[1]', 'neck[7]'],
     r"structure names level\(s\) \['neck\[7\]'\] that are not levels of the compact "
     r"network; its levels are \['backbone\[0\]', 'backbone\[1\]', 'backbone\[2\]', "
     r"'neck\[0\]', 'neck\[1\]', 'neck\[2\]'\]"),
    ('levels', ['backbone[1]', 'nek[0]'],
     r"level 'nek\[0\]': 'nek' is not a module of the compact YOLOV3 \(its top-level "
     r"modules: \['data_preprocessor', 'backbone', 'neck', 'bbox_head'\]\)"),
    ('levels', ['backbone[0]', 'neck[5]'],
     r"level\(s\) \['neck\[5\]'\] are not feature maps of the compact network; the maps "
     r"of those modules are \['backbone\[0\]', .*'neck\[2\]'\]"),
    ('levels', ['backbone[0]', 'backbone[1]'], r'levels must include the maps bbox_head reads'),
])
def test_a_level_that_does_not_exist_is_refused_with_the_names_that_do(option, value, message):
    overrides = {option: value}
    if option == 'structure':
        overrides['search'] = None
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ConfigError, match=message):
            build_model(SEARCH_DET, **overrides)


def test_structure_and_search_are_exclusive_and_search_options_are_checked():
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ConfigError, match='give structure= .* or search= .*, not both'):
            build_model(SEARCH_DET, structure=['backbone[0]'])
        with pytest.raises(ConfigError, match=r"unknown search option\(s\) \['fractoin'\]"):
            build_model(SEARCH_DET, search=dict(fractoin=0.3))
        with pytest.raises(ConfigError, match=r'search.fraction=1.5 must be in \(0, 1\]'):
            build_model(SEARCH_DET, search=dict(fraction=1.5))


# ---------------------------------------------------------------- one-way flow

def test_compact_network_computes_the_same_with_and_without_the_auxiliary_network(
        digits_data):
    model = aux_model()
    alone = copy.deepcopy(model.model)  # C with the same weights and BN statistics
    batch = a_batch(model, digits_data)
    at_iteration(0)
    torch.manual_seed(1)
    with_a = model.loss(**batch)
    torch.manual_seed(1)
    without = alone.loss(batch['inputs'], batch['data_samples'])
    assert aux_losses(with_a) and set(without) == set(with_a) - set(aux_losses(with_a))
    for key, value in without.items():
        torch.testing.assert_close(with_a[key], value, rtol=0, atol=0)
    # C's own losses give A nothing: no gradient flows from C back into A ...
    c_loss = total(model, {k: with_a[k] for k in without})
    a_params = list(model.blocks.parameters()) + list(model.aux_head.parameters())
    grads = torch.autograd.grad(c_loss, a_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    # ... while A's losses reach C's shared layers through the reads.
    a_loss = total(model, aux_losses(with_a))
    backbone = list(model.model.backbone.parameters())
    grads = torch.autograd.grad(a_loss, backbone, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # Inference is C's alone, the same as the copy's.
    assert_same_raw_outputs(alone, model, rtol=0)


# ----------------------------------------------------------------------- gates

def test_the_gates_get_gradients_from_the_task_and_the_penalty(digits_data):
    model = aux_model()
    batch = a_batch(model, digits_data)
    at_iteration(0)
    losses = model.loss(**batch)
    penalty = losses.pop('auxnet.loss_gate_sparsity')
    assert model.searching and float(penalty) > 0
    task = total(model, aux_losses(losses))
    task_grad, = torch.autograd.grad(task, model.gate_logits, retain_graph=True)
    penalty_grad, = torch.autograd.grad(penalty, model.gate_logits)
    # The first level's read has no gate (A starts there); every other gate learns.
    assert task_grad[0] == 0 and penalty_grad[0] == 0
    assert (task_grad[1:].abs() > 0).all()
    assert (penalty_grad[1:] > 0).all()  # the penalty closes the gates
    # Logged: every gate's value, only the penalty counts as a loss.
    gates = {k: float(v) for k, v in losses.items() if '.gate.' in k}
    assert gates['auxnet.gate.backbone[0]'] == 1.0
    assert all(v == pytest.approx(0.5) for k, v in gates.items() if k != 'auxnet.gate.backbone[0]')


def test_the_search_ends_at_its_fraction_of_the_schedule(digits_data):
    model = aux_model()  # fraction 0.3: iterations 0-2 of 10 search
    batch = a_batch(model, digits_data)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0, 1, -1, 1, -1, -1]) / 10)
    for it in range(3):
        at_iteration(it)
        assert 'auxnet.loss_gate_sparsity' in model.loss(**batch) and model.searching
    at_iteration(3)
    losses = model.loss(**batch)
    assert not model.searching and float(losses['auxnet.loss_gate_sparsity']) == 0
    assert model.structure == ['backbone[0]', 'backbone[1]', 'neck[0]']
    assert model.read_mask.tolist() == [1, 1, 0, 1, 0, 0]
    assert float(losses['auxnet.gate.backbone[2]']) == 0.0
    # Every parameter still gets a gradient (zero for the dropped ones): DDP needs no
    # find_unused_parameters after the switch.
    model.zero_grad(set_to_none=True)
    total(model, losses).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert float(model.gate_logits.grad.abs().sum()) == 0
    assert float(model.blocks[2].adapter[0].weight.grad.abs().sum()) == 0


def test_the_discrete_structure_rebuilds_the_same_network(digits_data):
    searched = aux_model()
    with torch.no_grad():
        searched.gate_logits.copy_(torch.tensor([0, -1, 1, -1, 1, -1]) / 10)
    assert searched.discretise() == ['backbone[0]', 'backbone[2]', 'neck[1]']
    record = searched.structure_record()
    assert record['structure'] == searched.structure and record['final']
    fixed = aux_model(search=None, structure=record['structure'])
    own, kept = fixed.state_dict(), searched.state_dict()
    assert set(own) < set(kept)  # the search's extra parts: gates and unused adapters
    fixed.load_state_dict({k: kept[k] for k in own}, strict=True)
    batch = a_batch(searched, digits_data)
    at_iteration(5)
    a, b = searched.loss(**batch), fixed.loss(**batch)
    assert float(a.pop('auxnet.loss_gate_sparsity')) == 0  # logged as 0 after the search
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_top_k_keeps_the_strongest_connections():
    model = aux_model(search=dict(fraction=0.3, top_k=2))
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([-9, 1, -3, 2, -1, -2]) / 10)
    assert model.discretise() == ['backbone[0]', 'backbone[1]', 'neck[0]']


def test_a_fixed_structure_builds_only_what_it_uses(digits_data):
    model = aux_model(FIXED_DET)
    assert model.structure == ['backbone[1]', 'backbone[2]', 'neck[0]']
    assert model.gate_logits is None and not model.searching
    assert model.blocks[0].conv is None  # before the first read: nothing to compute
    assert model.blocks[1].transition is None and model.blocks[4].adapter is None
    at_iteration(0)
    loss = total(model, model.loss(**a_batch(model, digits_data)))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


# ------------------------------------------------------------ through the Runner

@pytest.mark.slow
def test_expandnet_student_compact_checkpoint_round_trip(digits_data, tmp_path):
    """C as an ExpandNet: the compact checkpoint is the contracted C alone, loads strictly
    into the stock compact config and predicts what the trained C predicts; the
    checkpoint meta holds the searched structure."""
    work = tmp_path / 'work'
    cfg = tiny_cfg(SEARCH_DET, digits_data, work, 'det', max_iters=4)
    compact_model = cfg.model.model
    cfg.model.model = dict(type='ExpandNet', model=compact_model, strategy='cl', ratio=2)
    cfg.model.search = dict(fraction=0.5)
    cfg.model.cost_iters = (1, 3)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    assert expand_mm.expanded_layers(model.model) and not model.searching
    assert logged(runner, 'auxnet.loss_conf') > 0 and logged(runner, 'loss_conf') > 0
    assert set(model.cost_report) == {'search', 'train'}
    for cost in model.cost_report.values():
        assert cost['with_aux_s'] > 0 and cost['with_aux_peak_mib'] > cost['compact_peak_mib']

    compact = compact_checkpoint(work, 4)
    assert not any(k.startswith(('blocks.', 'aux_head.', 'model.', 'gate')) for k in compact)
    stock = load_stock(DET_COMPACT, compact)
    assert_same_raw_outputs(stock, model, model.model)
    meta = torch.load(work / 'iter_4.pth', weights_only=False)['meta']['aux_structure']
    assert meta['structure'] == model.structure and meta['final']
    assert meta['levels'] == DET_LEVELS and len(meta['gates']) == len(DET_LEVELS)
    assert set(meta['cost']) == {'search', 'train'}

    # The stock inference API takes the compact checkpoint with the compact config.
    from mmdet.apis import inference_detector, init_detector
    detector = init_detector(str(DET_COMPACT), str(work / 'iter_4_compact.pth'),
                             device='cpu', cfg_options=dict(
                                 model=dict(backbone=dict(init_cfg=None))))
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    assert inference_detector(detector, image).pred_instances.bboxes.shape[-1] == 4


@pytest.mark.slow
def test_resume_in_the_middle_of_the_search_goes_on_searching(digits_data, tmp_path):
    work = tmp_path / 'work'
    cfg = tiny_cfg(SEARCH_DET, digits_data, work, 'det', max_iters=6)
    cfg.model.search = dict(fraction=0.5)  # iterations 0-2 search
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    saved = torch.load(work / 'iter_2.pth', weights_only=False)
    assert saved['meta']['aux_structure']['final'] is False
    assert not bool(saved['state_dict']['structure_final'])

    cfg.work_dir = str(tmp_path / 'resumed')
    cfg.resume, cfg.load_from = True, str(work / 'iter_2.pth')
    runner = Runner.from_cfg(cfg)
    seen = []

    class Probe:  # what the model is at the start of each resumed iteration
        priority = 'VERY_LOW'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            model = runner.model
            seen.append((runner.iter, model.searching, model.gate_logits.detach().clone()))

    from mmengine.hooks import Hook
    runner.register_hook(type('ProbeHook', (Probe, Hook), {})())
    runner.train()
    first_it, searching, logits = seen[0]
    assert first_it == 2 and searching
    torch.testing.assert_close(logits, saved['state_dict']['gate_logits'])
    # Iteration 2 searched (the gates moved); the switch came inside iteration 3's step.
    assert [s for _, s, _ in seen] == [True, True, False, False]
    assert not torch.equal(seen[1][2], logits)
    final = torch.load(tmp_path / 'resumed/iter_6.pth', weights_only=False)
    assert final['meta']['aux_structure']['final'] is True


@pytest.mark.slow
def test_segmentor_search_trains_through_the_runner(digits_data, tmp_path):
    work = tmp_path / 'work'
    cfg = tiny_cfg(SEARCH_SEG, digits_data, work, 'seg', max_iters=4)
    cfg.model.search = dict(fraction=0.5)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    assert not model.searching and model.structure[0] == 'backbone.encoder.1'
    assert logged(runner, 'auxnet.loss_ce') > 0 and logged(runner, 'decode.loss_ce') > 0
    compact = compact_checkpoint(work, 4)
    assert set(compact) == set(model.model.state_dict())
    assert_same_raw_outputs(load_stock(SEG_COMPACT, compact), model, rtol=1e-6)


def test_configs_name_the_deployable_compact_model():
    compact = load_config(DET_COMPACT)
    for path in (SEARCH_DET, FIXED_DET):
        cfg = load_config(path)
        assert cfg.model.type == 'AuxHierarchy'
        assert expand_mm.models.deployable_model_cfg(cfg.model) == compact.model
    seg = load_config(SEARCH_SEG)
    assert expand_mm.models.deployable_model_cfg(seg.model) == \
        load_config(SEG_COMPACT).model


def run_tool_main(name: str, *args) -> int:
    """``tools/<name>.py ARGS...``'s exit code, run in this process."""
    import sys
    from expand_mm.cli import run_tool
    from wrapper_test_utils import load_tool
    tool = load_tool(name)
    argv, sys.argv = sys.argv, [f'{name}.py', *map(str, args)]
    try:
        return run_tool(tool.main)
    finally:
        sys.argv = argv


@pytest.mark.slow
def test_test_contract_and_export_tools_take_the_config_and_its_training_checkpoint(
        digits_data, tmp_path, capsys):
    from wrapper_test_utils import save_state
    model = aux_model()
    at_iteration(0)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0, 1, -1, 1, -1, -1]) / 10)
    model.discretise()
    ckpt = save_state(model, tmp_path / 'iter_1.pth')
    # contract.py: the compact network alone, strict in the stock compact config.
    out = tmp_path / 'deploy' / 'compact.pth'
    assert run_tool_main('contract', SEARCH_DET, ckpt, out, '--img-size', '64', '64') == 0
    assert_same_raw_outputs(load_stock(DET_COMPACT, torch.load(out)['state_dict']),
                            model.model)
    # export_onnx.py: the compact network's graph, checked against onnxruntime.
    onnx = tmp_path / 'compact.onnx'
    assert run_tool_main('export_onnx', SEARCH_DET, ckpt, onnx) == 0
    assert onnx.is_file() and 'max abs error' in capsys.readouterr().out
    # test.py: the wrapper config evaluates its compact network.
    cfg = tiny_cfg(SEARCH_DET, digits_data, tmp_path / 'test', 'det')
    cfg.test_evaluator.ann_file = str(digits_data / 'digits_det/annotations/instances_val.json')
    cfg.dump(str(tmp_path / 'tiny.py'))
    assert run_tool_main('test', tmp_path / 'tiny.py', ckpt, '--work-dir',
                         tmp_path / 'test') == 0
    assert 'Iter(test) [2/2]' in capsys.readouterr().out  # evaluated (untrained: no boxes)


def test_under_a_distiller_the_student_is_the_auxiliary_wrapper(digits_data, tmp_path):
    """``Distiller(student=AuxHierarchy(...))``: C learns from the teacher and from A; the
    distillation losses read C's modules under ``model.``; C is the deployed network."""
    from wrapper_test_utils import save_state
    distill = ROOT / 'projects/digits/configs/distill'
    kd = distill / 'kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'
    teacher_cfg = distill / 'yolo-lite-w2_1xb16-900i_digits-det-64x64.py'
    torch.manual_seed(1)
    teacher = build_model(teacher_cfg)
    cfg = load_config(kd)
    student = load_config(SEARCH_DET).model
    losses_cfg = [dict(item.to_dict(), student=f'model.{item.student}',
                       teacher=item.get('teacher', item.student))
                  for item in cfg.model.distill_losses]
    model_cfg = dict(cfg.model.to_dict(), student=student.to_dict(), distill_losses=losses_cfg,
                     teacher_ckpt=save_state(teacher, tmp_path / 'teacher.pth'),
                     data_preprocessor=cfg.data_preprocessor.to_dict())
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(model_cfg)
    assert type(model.student).__name__ == 'AuxHierarchy'
    assert expand_mm.models.deployable_model(model) is model.student.model
    model.init_weights()  # loads the teacher, as the Runner does
    model.train()
    at_iteration(0)
    losses = model.loss(**a_batch(model, digits_data))
    assert {'loss_kd', 'loss_feat', 'loss_conf', 'auxnet.loss_conf',
            'auxnet.loss_gate_sparsity'} <= set(losses)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in losses.items()
               if 'loss' in k and isinstance(v, torch.Tensor))


def test_levels_after_the_last_map_the_head_reads_are_refused():
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ConfigError, match=r"levels \['backbone\[2\]'\] come after "
                                              r"'neck\[2\]', the last map bbox_head reads"):
            build_model(SEARCH_DET, levels=DET_LEVELS + ['backbone[2]'])
