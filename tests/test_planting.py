"""Channel planting: masks equal a narrower net, growth keeps the function, old weights stay."""
import copy
import os.path as osp

import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.runner import Runner
from torch import nn

import expand_mm  # noqa: F401  (registers the hooks)
from expand_mm.planting import ChannelPlanter, PlantingError, stage_widths
from mm_test_utils import load_config, shrink_for_test

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMPACT = osp.join(ROOT, 'configs', 'yolo_lite', 'yolo-lite_8xb16-100e_voc0712.py')


class Chain(nn.Module):
    """conv-BN-act, max-pool, conv-BN-act, 1x1 prediction conv: a plain chain."""

    def __init__(self, width: int = 8, residual: bool = False):
        super().__init__()
        self.c1 = ConvModule(3, width, 3, padding=1, norm_cfg=dict(type='BN'))
        self.pool = nn.MaxPool2d(2)
        self.c2 = ConvModule(width, width, 3, padding=1, norm_cfg=dict(type='BN'))
        self.head = nn.Conv2d(width, 4, 1)
        self.residual = residual

    def forward(self, x):
        y = self.pool(self.c1(x))
        z = self.c2(y)
        return self.head(z + y if self.residual else z)


def trained_chain(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = Chain(**kwargs)
    for m in net.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def narrow_copy(net: Chain, width: int) -> Chain:
    """The same net with only the first ``width`` channels of c1 and c2."""
    small = Chain(width).eval()
    with torch.no_grad():
        for name in ('c1', 'c2'):
            big, little = getattr(net, name), getattr(small, name)
            cin = little.conv.in_channels
            little.conv.weight.copy_(big.conv.weight[:width, :cin])
            for attr in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(little.bn, attr).copy_(getattr(big.bn, attr)[:width])
        small.head.weight.copy_(net.head.weight[:, :width])
        small.head.bias.copy_(net.head.bias)
    return small


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_stage_widths_and_bad_settings():
    assert stage_widths(10, (0.25, 0.5, 1.0)) == [3, 5, 10]
    assert stage_widths(2, (0.1, 1.0)) == [1, 2]
    for bad in ((0.5, 0.9), (0.5, 0.5, 1.0), (0.0, 1.0), ()):
        with pytest.raises(PlantingError, match='stages='):
            stage_widths(8, bad)
    net = Chain()
    with pytest.raises(PlantingError, match=r"\['backbone\.\*'\] match no conv unit"):
        ChannelPlanter(net, ['backbone.*'], (0.5, 1.0))
    with pytest.raises(PlantingError, match='freeze='):
        ChannelPlanter(net, ['c1'], (0.5, 1.0), freeze='some')
    # A misspelled exclude would plant what it meant to keep at full width.
    with pytest.raises(PlantingError, match=r"exclude pattern\(s\) \['c3'\] match no conv unit"):
        ChannelPlanter(net, ['c*'], (0.5, 1.0), exclude=['c3'])
    # One pattern as a string (as --cfg-options passes it) is that pattern.
    assert [u.path for u in ChannelPlanter(net, 'c*', (0.5, 1.0), exclude='c2').units] == ['c1']
    grouped = Chain()
    grouped.c2 = ConvModule(8, 8, 3, padding=1, groups=2, norm_cfg=dict(type='BN'))
    with pytest.raises(PlantingError, match='c2: a grouped conv'):
        ChannelPlanter(grouped, ['c*'], (0.5, 1.0))
    expanded = Chain()
    expand_mm.expand_model(expanded, include=['c2.*'])
    with pytest.raises(PlantingError, match=r"Chain has expanded layers \(ExpandNet\), e.g. "
                                            r"\['c2.conv'\]: channel planting works on a compact"):
        ChannelPlanter(expanded, ['c*'], (0.5, 1.0))


def test_first_stage_computes_the_narrow_network():
    net = trained_chain()
    full_width = net(X)
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0))
    planter.start()
    assert planter.active_widths() == {'c1': (4, 8), 'c2': (4, 8)}
    torch.testing.assert_close(net(X), narrow_copy(net, 4)(X), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(net(X), full_width, atol=1e-3), 'the masks must matter'


def test_advance_keeps_the_function_and_zeroes_only_old_rows_of_new_columns():
    net = trained_chain()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0))
    planter.start()
    before = net(X).clone()
    c2_new_rows = net.c2.conv.weight[4:].clone()
    planter.advance(lambda: net(X))
    torch.testing.assert_close(net(X), before, rtol=0, atol=1e-6)
    w2 = net.c2.conv.weight
    assert torch.count_nonzero(w2[:4, 4:]) == 0, 'old rows of c2 must not read new channels'
    assert torch.equal(w2[4:], c2_new_rows), 'new rows keep their initial filters'
    assert torch.count_nonzero(net.head.weight[:, 4:]) == 0
    assert torch.count_nonzero(net.head.weight[:, :4]) == 16
    assert planter.stage == 1 and not planter._handles, 'last stage: no mask left'
    with pytest.raises(PlantingError, match='last stage'):
        planter.advance(lambda: net(X))


def test_frozen_entries_survive_sgd_with_momentum_and_weight_decay():
    net = trained_chain().train()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0))
    planter.start()
    planter.advance(lambda: net(X))
    old = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.register_step_post_hook(lambda *_: planter.restore_frozen())
    for _ in range(3):
        opt.zero_grad()
        net(X).square().mean().backward()
        assert torch.count_nonzero(net.c1.conv.weight.grad[:4]) == 0, 'frozen grads are zero'
        opt.step()
    w1, w2 = net.c1.conv.weight, net.c2.conv.weight
    assert torch.equal(w1[:4], old['c1.conv.weight'][:4])
    assert torch.equal(w2[:4, :4], old['c2.conv.weight'][:4, :4])
    assert torch.equal(net.c1.bn.weight[:4], old['c1.bn.weight'][:4])
    assert torch.equal(net.head.bias, old['head.bias'])
    assert torch.equal(net.head.weight[:, :4], old['head.weight'][:, :4])
    # What trains: new filters, their norm parameters, the new columns of the readers.
    assert not torch.equal(w1[4:], old['c1.conv.weight'][4:])
    assert not torch.equal(net.c1.bn.bias[4:], old['c1.bn.bias'][4:])
    assert torch.count_nonzero(w2[:4, 4:]) > 0
    assert torch.count_nonzero(net.head.weight[:, 4:]) > 0
    trainable = planter.num_trainable_entries()
    assert trainable == (4 * 3 * 9 + 4 * 2) + (4 * 8 * 9 + 4 * 4 * 9 + 4 * 2) + 4 * 4


@pytest.mark.parametrize('freeze', ['all', 'none'])
def test_unplanted_entries_stay_bit_identical_through_first_stage_adamw_steps(freeze):
    """AdamW's decoupled weight decay shrinks every entry, gradient or not: the channels not
    planted yet (filters, norm parameters, the columns that read them) are held from the
    first stage on, and only the narrow network's entries count as training."""
    net = trained_chain().train()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0), freeze=freeze)
    planter.start(0, lambda: net(X))
    old = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.5)
    opt.register_step_post_hook(lambda *_: planter.restore_frozen())
    for _ in range(3):
        opt.zero_grad()
        net(X).square().mean().backward()
        opt.step()
    unplanted = {'c1.conv.weight': net.c1.conv.weight[4:], 'c1.bn.weight': net.c1.bn.weight[4:],
                 'c1.bn.bias': net.c1.bn.bias[4:], 'c2.conv.weight': net.c2.conv.weight[4:],
                 'c2.bn.weight': net.c2.bn.weight[4:], 'c2.bn.bias': net.c2.bn.bias[4:]}
    for key, value in unplanted.items():
        assert torch.equal(value, old[key][4:]), f'{key}: unplanted rows moved'
    # The planted rows' columns that read c1's unplanted channels, and the head's.
    assert torch.equal(net.c2.conv.weight[:4, 4:], old['c2.conv.weight'][:4, 4:])
    assert torch.equal(net.head.weight[:, 4:], old['head.weight'][:, 4:])
    # The narrow network trains, all of it.
    assert not torch.equal(net.c1.conv.weight[:4], old['c1.conv.weight'][:4])
    assert not torch.equal(net.c2.conv.weight[:4, :4], old['c2.conv.weight'][:4, :4])
    assert not torch.equal(net.head.weight[:, :4], old['head.weight'][:, :4])
    narrow = sum(p.numel() for p in narrow_copy(net, 4).parameters())
    assert planter.num_trainable_entries() == narrow == 288
    # Planting the last stage opens them, with the values they were initialised with
    # (old rows' new columns start at zero so the function is kept).
    planter.advance(lambda: net(X))
    assert torch.equal(net.c2.conv.weight[4:], old['c2.conv.weight'][4:])
    assert torch.count_nonzero(net.c2.conv.weight[:4, 4:]) == 0
    if freeze == 'none':
        assert planter.num_trainable_entries() == sum(p.numel() for p in net.parameters())


def test_messages_number_stages_from_one():
    from expand_mm.planting import stage_label
    assert stage_label(1, (0.25, 0.5, 0.75, 1.0)) == 'stage 2 of 4 (50% of channels)'
    net = trained_chain()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0))
    with pytest.raises(PlantingError, match=r'stage index 2 is out of range.*indices 0 to 1'):
        planter.start(2)
    planter.start()
    planter.advance(lambda: net(X))
    with pytest.raises(PlantingError,
                       match=r'already at the last stage \(stage 2 of 2 \(100% of channels\)\)'):
        planter.advance(lambda: net(X))


def test_freeze_none_trains_everything():
    net = trained_chain().train()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0), freeze='none')
    planter.start()
    planter.advance(lambda: net(X))
    assert planter.num_trainable_entries() == sum(p.numel() for p in net.parameters())


def test_resume_finds_the_same_frozen_set():
    net = trained_chain()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.25, 0.5, 1.0))
    planter.start()
    planter.advance(lambda: net(X))
    resumed_net = copy.deepcopy(net)
    resumed = ChannelPlanter(resumed_net, ['c1', 'c2'], (0.25, 0.5, 1.0))
    resumed.start(1, lambda: resumed_net(X))
    torch.testing.assert_close(resumed_net(X), net(X), rtol=0, atol=0)
    masks = {n: f for n, p in net.named_parameters()
             for q, (f, _) in planter._frozen.items() if q is p}
    masks_resumed = {n: f for n, p in resumed_net.named_parameters()
                     for q, (f, _) in resumed._frozen.items() if q is p}
    assert masks.keys() == masks_resumed.keys() and masks
    assert all(torch.equal(masks[k], masks_resumed[k]) for k in masks)
    with pytest.raises(PlantingError, match='needs a probe'):
        ChannelPlanter(copy.deepcopy(net), ['c1', 'c2'], (0.25, 0.5, 1.0)).start(1)


def test_a_residual_path_is_refused_and_nothing_changes():
    net = trained_chain(residual=True)
    planter = ChannelPlanter(net, ['c1'], (0.5, 1.0))
    planter.start()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(PlantingError, match='plain conv chains'):
        planter.advance(lambda: net(X))
    assert planter.stage == 0
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def tiny_cfg(data_root, work_dir, max_iters, milestones):
    cfg = load_config(COMPACT)
    shrink_for_test(cfg, str(work_dir), data_root, (96, 96), max_iters)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False)
    cfg.custom_hooks = [dict(type='ChannelPlantingHook', include=['backbone.*', 'neck.*'],
                             stages=(0.5, 1.0), milestones=milestones)]
    return cfg


@pytest.mark.slow
def test_hook_plants_in_the_real_runner_and_resumes(voc_root, tmp_path):
    cfg = tiny_cfg(voc_root, tmp_path / 'work', max_iters=4, milestones=[2])
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'ChannelPlantingHook')
    assert hook.planter.stage == 1 and not hook.planter._handles
    work = cfg.work_dir
    at2 = torch.load(osp.join(work, 'iter_2.pth'))
    at4 = torch.load(osp.join(work, 'iter_4.pth'))
    assert at2['meta']['channel_planting']['stage'] == 1
    # Stages numbered from 1, as the checkpoint tools name them ("stage 1 of 2").
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        logged = [line for line in f if 'ChannelPlantingHook: ' in line]
    assert any('this run starts at stage 1 of 2 (50% of channels)' in line for line in logged)
    assert any('ChannelPlantingHook: stage 1 of 2 (50% of channels): ' in line
               for line in logged)
    assert any('ChannelPlantingHook: planted stage 2 of 2 (100% of channels): ' in line
               for line in logged)
    # Only the half-width network trains at first; every entry once all is planted.
    counts = [int(line.split('planted; ')[1].split(' parameter')[0].replace(',', ''))
              for line in logged if 'parameter entries train' in line]
    total = sum(p.numel() for p in runner.model.parameters())
    assert len(counts) == 2 and counts[0] < total // 2 and counts[1] < total
    assert torch.load(osp.join(work, 'iter_1.pth'))['meta']['channel_planting']['stage'] == 0
    key = 'backbone.stages.3.conv.conv.weight'  # 128 channels: 64 planted at stage 0
    assert torch.equal(at2['state_dict'][key][:64, :32], at4['state_dict'][key][:64, :32])
    assert not torch.equal(at2['state_dict'][key][64:], at4['state_dict'][key][64:])
    # The final checkpoint is the stock compact model.
    cfg_stock = load_config(COMPACT)
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        compact = MODELS.build(cfg_stock.model)
    compact.load_state_dict(at4['state_dict'], strict=True)
    # Before the last stage the masks are hooks: the compact copy zeroes the unplanted
    # channels, so the stock network of it computes what the masked one did.
    from expand_mm.deploy import write_compact_checkpoint
    from expand_mm.planting import unfinished_planting
    assert unfinished_planting(at2['meta']) is None and unfinished_planting({}) is None
    at1 = torch.load(osp.join(work, 'iter_1.pth'))
    assert at1['meta']['channel_planting']['masked_entries'][key] == 64
    out, errors = write_compact_checkpoint(compact, osp.join(work, 'iter_1.pth'),
                                           str(tmp_path / 'out.pth'))
    baked = torch.load(out)
    assert baked['meta']['expand_mm']['channel_planting']['stage'] == 0
    assert errors['max_rel'] <= 1e-4
    assert torch.count_nonzero(baked['state_dict'][key][64:]) == 0
    assert torch.equal(baked['state_dict'][key][:64], at1['state_dict'][key][:64])
    stock_baked = copy.deepcopy(compact).eval()
    stock_baked.load_state_dict(baked['state_dict'], strict=True)
    masked = copy.deepcopy(compact).eval()
    masked.load_state_dict(at1['state_dict'], strict=True)
    ChannelPlanter(masked, ['backbone.*', 'neck.*'], (0.5, 1.0)).start(0)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = masked(x, mode='tensor'), stock_baked(x, mode='tensor')
        unmasked = copy.deepcopy(compact).eval()
        unmasked.load_state_dict(at1['state_dict'], strict=True)
        raw = unmasked(x, mode='tensor')
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from expand_mm.verification import flatten_tensors
    assert any((w - r).abs().max() > 1e-3
               for w, r in zip(flatten_tensors(want), flatten_tensors(raw))), \
        'the unplanted channels matter: the raw weights alone compute something else'

    # tools/test.py refuses the raw mid-run checkpoint (the stock model would run the
    # unplanted channels); tools/contract.py writes the same compact copy as above.
    import subprocess
    import sys
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), COMPACT,
                             osp.join(work, 'iter_1.pth')], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'saved at channel-planting stage 1 of 2' in result.stderr
    assert 'Test its compact copy' in result.stderr
    by_tool = tmp_path / 'by_tool.pth'
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'contract.py'), COMPACT,
                             osp.join(work, 'iter_1.pth'), str(by_tool), '--img-size', '96',
                             '96'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    tool_weights = torch.load(by_tool)['state_dict']
    assert all(torch.equal(tool_weights[k], v) for k, v in baked['state_dict'].items())

    # Resume from iteration 3 (stage 1): the frozen entries stay those of iteration 2.
    cfg = tiny_cfg(voc_root, tmp_path / 'work', max_iters=4, milestones=[2])
    cfg.resume = True
    cfg.load_from = osp.join(work, 'iter_3.pth')
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'ChannelPlantingHook')
    assert hook.planter.stage == 1
    again = torch.load(osp.join(work, 'iter_4.pth'))
    assert torch.equal(at2['state_dict'][key][:64, :32], again['state_dict'][key][:64, :32])


def test_baking_refuses_a_unit_whose_activation_is_not_zero_at_zero(tmp_path):
    from expand_mm.planting import PlantingBakeError, bake_planting_masks
    net = trained_chain()
    planter = ChannelPlanter(net, ['c1', 'c2'], (0.5, 1.0))
    planter.start()
    planting = dict(stage=0, stages=[0.5, 1.0], masked_entries=planter.masked_entries(),
                    widths={p: a for p, (a, _) in planter.active_widths().items()})
    assert planting['masked_entries'] == {'c1.conv.weight': 4, 'c1.bn.weight': 4,
                                          'c1.bn.bias': 4, 'c2.conv.weight': 4,
                                          'c2.bn.weight': 4, 'c2.bn.bias': 4}
    # As in training: the planter's masks are on the model being baked.
    baked, errors = bake_planting_masks(net, net.state_dict(), planting, (1, 3, 16, 16))
    assert errors['max_rel'] <= 1e-6 and torch.count_nonzero(baked['c2.bn.bias'][4:]) == 0
    net.c2.activate = nn.Sigmoid()  # sigmoid(0) = 0.5: zeroed weights still output 0.5
    with pytest.raises(PlantingBakeError, match=r"unit\(s\) \['c2'\] still output up to 0.5"):
        bake_planting_masks(net, net.state_dict(), planting, (1, 3, 16, 16))
    planter.remove()
    with pytest.raises(PlantingBakeError, match=r"unit\(s\) \['c2'\] still output up to 0.5"):
        bake_planting_masks(net, net.state_dict(), planting, (1, 3, 16, 16))
    with pytest.raises(PlantingBakeError, match='older expand_mm'):
        bake_planting_masks(net, net.state_dict(), dict(planting, masked_entries=None))


def test_a_norm_before_the_conv_is_not_baked():
    """order=('norm', 'conv', 'act'): the norm's rows are input channels, not planted ones."""
    from expand_mm.planting import bake_planting_masks
    torch.manual_seed(0)
    net = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='BN')),
                        ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='BN'),
                                   order=('norm', 'conv', 'act')),
                        nn.Conv2d(8, 2, 1)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.uniform_(0.1, 0.5)
    planter = ChannelPlanter(net, ['0', '1'], (0.5, 1.0))
    planter.start()
    entries = planter.masked_entries()
    assert '1.bn.weight' not in entries and entries['1.conv.weight'] == 4
    assert entries['0.bn.weight'] == 4
    planting = dict(stage=0, stages=[0.5, 1.0], masked_entries=entries,
                    widths={p: a for p, (a, _) in planter.active_widths().items()})
    _, errors = bake_planting_masks(net, net.state_dict(), planting, (1, 3, 16, 16))
    assert errors['max_rel'] <= 1e-6


def test_hook_settings_are_checked():
    from expand_mm.hooks.channel_planting import ChannelPlantingHook
    with pytest.raises(PlantingError, match='milestones=.*1 for stages'):
        ChannelPlantingHook(include=['backbone.*'], stages=(0.5, 1.0), milestones=[2, 3])
    with pytest.raises(PlantingError, match='strictly increasing positive ints'):
        ChannelPlantingHook(include=['backbone.*'], stages=(0.25, 0.5, 1.0), milestones=[3, 2])


@pytest.mark.slow
def test_planting_config_writes_a_compact_copy_of_every_stage(digits_data, tmp_path):
    """The distilled planting config in the real Runner: each stage's checkpoint gets a
    stock compact twin, the narrower network of that stage."""
    from test_distiller import TEACHER_DET, teacher_checkpoint
    from wrapper_test_utils import DET_COMPACT, load_stock, tiny_cfg
    work = tmp_path / 'work'
    cfg = tiny_cfg(osp.join(ROOT, 'projects', 'digits', 'configs', 'planting',
                            'plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'),
                   digits_data, work, 'det', max_iters=5)
    cfg.model.teacher_ckpt = teacher_checkpoint(TEACHER_DET, tmp_path / 'teacher.pth')
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False)
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'ChannelPlantingHook')
    hook['milestones'] = [2, 3, 4]  # iter_N.pth is saved after the planting at N
    runner = Runner.from_cfg(cfg)
    runner.train()
    key = 'backbone.stages.3.conv.conv.weight'  # 128 channels: 32, 64, 96, 128 planted
    for it, planted in ((1, 32), (2, 64), (3, 96), (4, 128), (5, 128)):
        saved = torch.load(work / f'iter_{it}_compact.pth')
        weights = saved['state_dict']
        load_stock(DET_COMPACT, weights)  # strict: stock keys and shapes
        assert torch.count_nonzero(weights[key][planted:]) == 0
        assert torch.count_nonzero(weights[key][:planted]) > 0
        planting = saved['meta']['expand_mm'].get('channel_planting')
        if it < 4:
            assert planting['stage'] == it - 1 and planting['bake_error']['max_rel'] <= 1e-4
        else:
            assert planting is None
    final = torch.load(work / 'iter_5_compact.pth')['state_dict']
    student = runner.model.student.state_dict()
    assert set(final) == set(student)
    assert all(torch.equal(final[k], student[k].cpu()) for k in final)
    # load_from= a compact checkpoint starts the student from it (the config's load hook
    # re-keys it under 'student.'; without it mmengine would load nothing, non-strictly).
    cfg.load_from = str(work / 'iter_2_compact.pth')
    cfg.work_dir = str(tmp_path / 'work2')
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    loaded = runner.model.student.state_dict()
    stage1 = torch.load(work / 'iter_2_compact.pth')['state_dict']
    assert all(torch.equal(loaded[k].cpu(), stage1[k]) for k in stage1)


@pytest.mark.slow
def test_a_plain_segmenter_being_planted_gets_a_compact_copy_of_each_unfinished_stage(
        digits_data, tmp_path):
    """Without a Distiller (a plain mmseg model, SegDataPreprocessor on the probe batch),
    ContractCheckpointHook writes the stage's narrower network before the last stage and
    leaves the later checkpoints, stock models already, as they are."""
    from wrapper_test_utils import SEG_COMPACT, tiny_cfg
    cfg = tiny_cfg(SEG_COMPACT, digits_data, tmp_path / 'work', 'seg', max_iters=3)
    cfg.custom_hooks = [dict(type='ContractCheckpointHook'),
                        dict(type='ChannelPlantingHook', include=['backbone.*'],
                             stages=(0.5, 1.0), milestones=[2])]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False)
    Runner.from_cfg(cfg).train()
    work = tmp_path / 'work'
    assert (work / 'iter_1_compact.pth').is_file()
    assert not (work / 'iter_2_compact.pth').exists() and (work / 'iter_3.pth').is_file()
    compact = expand_mm.read_checkpoint(str(work / 'iter_1_compact.pth'))
    assert compact['meta']['expand_mm']['channel_planting']['stage'] == 0
    zero_filters = [k for k, v in compact['state_dict'].items()
                    if k.startswith('backbone.') and k.endswith('conv.weight')
                    and v.flatten(1).abs().sum(1).eq(0).any()]
    assert zero_filters  # the unplanted half of the planted units' filters
