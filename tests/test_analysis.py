"""Gradient confusion and loss landscape: known constructions, exactness, the tools."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expand_mm
from expand_mm.analysis import (GradientConfusionResult, filter_normalized_direction,
                                gradient_confusion, loss_landscape_1d, loss_landscape_2d)
from expand_mm.analysis.loss_landscape import landscape_parameters, mean_loss

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class TinyNet(nn.Module):
    """conv-BN-ReLU, conv-ReLU, global pool, linear: 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_batches(n, seed=0, size=6, batch=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n)]


def tiny_pair(seed=0):
    """A compact TinyNet and its ExpandNet-CL r=2 copy computing the same function."""
    torch.manual_seed(seed)
    net = TinyNet()
    expanded = copy.deepcopy(net)
    report = expand_mm.expand_model(expanded, strategy='cl', ratio=2, keep_weights=True)
    assert len(report.layers) == 2
    return net, expanded


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(before, model):
    after = model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ------------------------------------------------------------ gradient confusion

def test_identical_batches_have_cosine_one():
    torch.manual_seed(0)
    net = TinyNet()
    batch = make_batches(1)[0]
    result = gradient_confusion(net, [batch, batch, batch], ce_loss)
    s = result.summary()
    assert s['num_pairs'] == 3 and s['num_batches'] == 3
    np.testing.assert_allclose(result.cosines, 1.0, atol=1e-6)
    assert s['frac_negative'] == 0.0 and result.eta == 0.0
    assert s['num_params'] == sum(p.numel() for p in net.parameters())


def test_label_flipped_twin_has_negative_cosine():
    # Least squares through the origin at w = 0: the gradient -2 mean(y x) of
    # a batch is exactly the negative of its twin's with y -> -y.
    model = nn.Linear(5, 1, bias=False)
    nn.init.zeros_(model.weight)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)

    def mse(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    result = gradient_confusion(model, [(x, y), (x, -y)], mse)
    g = (-2 * (y * x).mean(0)).double()
    assert result.cosines[0] == pytest.approx(-1.0, abs=1e-6)
    assert result.summary()['frac_negative'] == 1.0
    assert result.eta == pytest.approx(float(g @ g), rel=1e-5)


class Vectors(nn.Module):
    """loss(theta, v) = <theta, v>: the gradient of a 'batch' v is v itself."""

    def __init__(self, dim):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))


def dot_loss(model, v):
    return (model.theta * v).sum()


HAND_MADE = [torch.tensor([1., 0., 0.]), torch.tensor([-1., 1., 0.]), torch.tensor([0., 2., 2.])]


@pytest.mark.parametrize('on_disk', [False, True])
def test_eta_and_statistics_on_hand_made_vectors(tmp_path, on_disk):
    store = str(tmp_path / 'grads') if on_disk else None
    result = gradient_confusion(Vectors(3), HAND_MADE, dot_loss, store_dir=store)
    vectors = torch.stack(HAND_MADE).double().numpy()
    np.testing.assert_allclose(result.gram, vectors @ vectors.T)
    # pairs (0,1), (0,2), (1,2): inner -1, 0, 2; cosines -1/sqrt2, 0, 2/(sqrt2*sqrt8) = 1/2
    np.testing.assert_allclose(result.inner_products, [-1, 0, 2])
    np.testing.assert_allclose(result.cosines, [-1 / math.sqrt(2), 0, 0.5], atol=1e-12)
    s = result.summary()
    assert s['num_pairs'] == 3 and result.eta == 1.0
    assert s['frac_negative'] == pytest.approx(1 / 3)
    assert s['min_cos'] == pytest.approx(-1 / math.sqrt(2))
    assert s['median_cos'] == 0.0
    assert s['mean_cos'] == pytest.approx((0.5 - 1 / math.sqrt(2)) / 3)
    if on_disk:
        assert os.listdir(store) == []  # the vectors are removed afterwards
    density, edges = result.histogram(bins=10)
    assert (density * np.diff(edges)).sum() == pytest.approx(1.0)
    grid = np.linspace(-1, 1, 2001)
    assert (result.density(grid) * (grid[1] - grid[0])).sum() == pytest.approx(1.0, abs=0.02)
    json.dumps(result.to_dict(), allow_nan=False)


def test_eta_is_zero_without_negative_pairs_and_zero_gradients_are_undefined():
    result = GradientConfusionResult(gram=np.array([[1., 0.5, 0.], [0.5, 1., 0.], [0., 0., 0.]]),
                                     losses=[0., 0., 0.])
    s = result.summary()
    assert result.eta == 0.0
    assert s['undefined_pairs'] == 2 and s['mean_cos'] == pytest.approx(0.5)
    json.dumps(result.to_dict(), allow_nan=False)


def test_model_state_is_left_alone():
    net, expanded = tiny_pair()
    for model in (net, expanded):
        model.eval()
        before = snapshot(model)  # BN running stats included
        gradient_confusion(model, make_batches(2), ce_loss, space='compact')
        gradient_confusion(model, make_batches(2), ce_loss, bn='eval')
        assert_bit_equal(before, model)
        assert not model.training
        assert all(p.grad is None for p in model.parameters())
    assert len(expand_mm.expanded_layers(expanded)) == 2  # compact_form put them back


@pytest.mark.parametrize('mode', ['online', 'explicit'])
def test_compact_space_is_the_same_for_a_model_and_its_expandnet(mode):
    net, expanded = tiny_pair()
    expand_mm.set_expand_mode(expanded, mode)
    batches = make_batches(4, seed=3)
    compact = gradient_confusion(net, batches, ce_loss, space='compact')
    same = gradient_confusion(expanded, batches, ce_loss, space='compact')
    assert compact.num_params == same.num_params
    np.testing.assert_allclose(same.gram, compact.gram, rtol=1e-4,
                               atol=1e-6 * np.abs(compact.gram).max())
    np.testing.assert_allclose(same.cosines, compact.cosines, atol=1e-5)
    assert same.losses == pytest.approx(compact.losses, rel=1e-5)
    # The compact model's compact space is its training space; the ExpandNet's is not.
    np.testing.assert_array_equal(
        gradient_confusion(net, batches, ce_loss, space='training').gram, compact.gram)
    training = gradient_confusion(expanded, batches, ce_loss, space='training')
    assert training.num_params > compact.num_params
    assert not np.allclose(training.cosines, compact.cosines, atol=1e-3)


def test_bad_settings_are_refused():
    net = TinyNet()
    with pytest.raises(ValueError, match='space'):
        gradient_confusion(net, make_batches(2), ce_loss, space='factors')
    with pytest.raises(ValueError, match='at least 2'):
        gradient_confusion(net, make_batches(1), ce_loss)
    with pytest.raises(TypeError, match='scalar'):
        gradient_confusion(net, make_batches(2), lambda m, b: m(b[0]))


# ----------------------------------------------------------------- loss landscape

def test_landscape_centre_is_the_plain_loss_and_parameters_are_restored():
    net, expanded = tiny_pair()
    batches = make_batches(2)
    for model in (net, expanded):
        model.train()
        before = snapshot(model)
        model.eval()
        plain = mean_loss(model, batches, ce_loss)
        model.train()
        one = loss_landscape_1d(model, batches, ce_loss, steps=5, seed=0)
        two = loss_landscape_2d(model, batches, ce_loss, steps=3, seed=0)
        assert one.base_loss == plain and one.center_loss == plain
        assert two.center_loss == plain
        assert model.training  # eval only while evaluating
        assert_bit_equal(before, model)
        assert len(two.losses) == 3 and all(len(row) == 3 for row in two.losses)
        # d1 of the plane is the line's direction: the row y = 0 is the curve
        # at the same coordinates.
        line = loss_landscape_1d(model, batches, ce_loss, steps=3, seed=0)
        assert two.losses[two.y.index(0.0)] == line.losses
        assert len(set(one.losses)) > 1  # the direction does move the loss
    # The same function, so the same loss at the centre.
    assert loss_landscape_1d(expanded, batches, ce_loss, steps=3).base_loss == \
        pytest.approx(loss_landscape_1d(net, batches, ce_loss, steps=3).base_loss, rel=1e-5)


def test_landscape_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    net = TinyNet()
    batches = make_batches(1)
    a = loss_landscape_1d(net, batches, ce_loss, steps=5, seed=7)
    b = loss_landscape_1d(net, batches, ce_loss, steps=5, seed=7)
    c = loss_landscape_1d(net, batches, ce_loss, steps=5, seed=8)
    assert a.losses == b.losses
    assert a.losses != c.losses
    json.dumps(a.to_dict(), allow_nan=False)


def test_filter_normalised_direction():
    net, expanded = tiny_pair()
    for model in (net, expanded):
        params = [p for _, p in landscape_parameters(model)]
        first = filter_normalized_direction(params, torch.Generator().manual_seed(0))
        again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
        for p, d, d2 in zip(params, first, again):
            assert d.shape == p.shape and d.dtype == p.dtype and torch.equal(d, d2)
            if p.dim() <= 1:  # biases and BN parameters are not moved
                assert not d.any()
                continue
            torch.testing.assert_close(d.reshape(len(d), -1).norm(dim=1),
                                       p.detach().reshape(len(p), -1).norm(dim=1))
            assert not torch.allclose(d, p)


def test_compact_form_landscape_leaves_the_expandnet_alone():
    net, expanded = tiny_pair()
    batches = make_batches(1)
    before = snapshot(expanded)
    compact = loss_landscape_1d(expanded, batches, ce_loss, steps=3, form='compact')
    training = loss_landscape_1d(expanded, batches, ce_loss, steps=3)
    assert_bit_equal(before, expanded)
    assert compact.num_params == sum(p.numel() for p in net.parameters())
    assert training.num_params > compact.num_params
    reference = loss_landscape_1d(net, batches, ce_loss, steps=3)
    assert compact.center_loss == pytest.approx(reference.center_loss, rel=1e-5)
    # Same seed, same shapes and (nearly) the same weights: the same curve.
    assert compact.losses == pytest.approx(reference.losses, rel=1e-4)


# --------------------------------------------------------------------------- tools

VOC_EXPANDNET = osp.join(ROOT, 'configs', 'expandnet',
                         'expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py')
VOC_COMPACT = osp.join(ROOT, 'configs', 'yolo_lite', 'yolo-lite_8xb16-100e_voc0712.py')


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        f'{name}_tool_under_test', osp.join(ROOT, 'tools', 'analysis', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def voc_cfgs(tmp_path_factory, voc_root):
    """The compact YOLO-LITE VOC config and its ExpandNet (r=2), on 6 tiny VOC images at 96x96."""
    from mmengine.config import Config

    from mm_test_utils import shrink_for_test

    tmp = tmp_path_factory.mktemp('analysis')
    cfgs = []
    for path in (VOC_COMPACT, VOC_EXPANDNET):
        cfg = Config.fromfile(path)
        shrink_for_test(cfg, str(tmp / 'work'), voc_root, (96, 96))
        cfgs.append(cfg)
    # Ratio 2 instead of 4: a quarter of the kernel compositions that every
    # landscape point pays, and still a larger training form.
    cfgs[1].model.ratio = 2
    return tmp, cfgs


def test_runs_pair_configs_checkpoints_and_unique_labels():
    from expand_mm.analysis.runs import resolve_runs, safe_name
    runs = resolve_runs(['a/x.py', 'b/x.py', 'y.py'], ['none', 'c.pth', '-'], None)
    assert [r['label'] for r in runs] == ['x#0', 'x#1', 'y']
    assert [r['checkpoint'] for r in runs] == [None, 'c.pth', None]
    with pytest.raises(ValueError, match='--checkpoint: got 1 for 2 configs'):
        resolve_runs(['x.py', 'y.py'], ['c.pth'], None)
    with pytest.raises(ValueError, match='--labels must be unique'):
        resolve_runs(['x.py', 'y.py'], None, ['same', 'same'])
    assert safe_name('a b/c#1') == 'a_b_c_1'


@pytest.mark.slow
def test_gradient_confusion_tool(voc_cfgs):
    """Compact checkpoint into both configs: the same figures in the compact space."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    tmp, cfgs = voc_cfgs
    register_all_modules(init_default_scope=False)
    compact_model = MODELS.build(copy.deepcopy(cfgs[0].model))
    compact_model.init_weights()
    ckpt = str(tmp / 'compact.pth')
    torch.save(dict(state_dict=compact_model.state_dict(), meta={}), ckpt)

    out = str(tmp / 'gc')
    tool = _load_tool('gradient_confusion')
    entries = tool.main(['--num-batches', '3', '--space', 'compact', '--out', out,
                         '--checkpoint', ckpt, ckpt, '--labels', 'compact', 'expandnet'],
                        configs=cfgs)
    data = json.load(open(osp.join(out, 'gradient_confusion.json')))
    assert [r['meta']['label'] for r in data['runs']] == ['compact', 'expandnet']
    compact, expandnet = (r['summary'] for r in entries)
    assert compact['num_pairs'] == expandnet['num_pairs'] == 3
    assert compact['num_params'] == expandnet['num_params']
    assert entries[1]['meta']['expanded_layers'] > 0
    assert entries[1]['meta']['training_params'] > 2 * compact['num_params']
    # Equal up to where the network is not differentiable: the factorised
    # weights round differently (~1e-8), which flips exact max-pool ties on
    # the flat regions of these images (measured: 1.4e-3 of |g|^2 on one
    # batch, all in the first two backbone stages, losses equal to 1e-7). The
    # exact equality is test_compact_space_is_the_same_for_a_model_and_its_expandnet.
    gram_c, gram_e = np.array(entries[0]['gram']), np.array(entries[1]['gram'])
    np.testing.assert_allclose(gram_e, gram_c, atol=5e-3 * np.diag(gram_c).max())
    np.testing.assert_allclose(entries[1]['cosines'], entries[0]['cosines'], atol=2e-3)
    assert expandnet['mean_loss'] == pytest.approx(compact['mean_loss'], rel=1e-5)
    with open(osp.join(out, 'gradient_confusion.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_comma_separated_checkpoints_become_runs_of_one_group():
    from expand_mm.analysis.runs import resolve_runs, split_seed_runs
    runs = split_seed_runs(resolve_runs(['x.py', 'y.py'], ['s0.pth,s1.pth,none', 'c.pth'],
                                        ['compact', 'expandnet']))
    assert [(r['label'], r['group'], r['checkpoint']) for r in runs] == [
        ('compact#0', 'compact', 's0.pth'), ('compact#1', 'compact', 's1.pth'),
        ('compact#2', 'compact', None), ('expandnet', 'expandnet', 'c.pth')]


@pytest.mark.slow
def test_gradient_confusion_tool_pools_the_runs_of_a_config(voc_cfgs, capsys):
    """Two checkpoints of one config: two runs on the same batches, statistics as mean ± std."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    tmp, cfgs = voc_cfgs
    register_all_modules(init_default_scope=False)
    ckpts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = MODELS.build(copy.deepcopy(cfgs[0].model))
        model.init_weights()
        ckpts.append(str(tmp / f'compact_seed{seed}.pth'))
        torch.save(dict(state_dict=model.state_dict(), meta={}), ckpts[-1])
    out = str(tmp / 'gc_runs')
    tool = _load_tool('gradient_confusion')
    entries = tool.main(['--num-batches', '3', '--out', out, '--checkpoint', ','.join(ckpts),
                         '--labels', 'compact'], configs=cfgs[:1])
    assert [e['meta']['label'] for e in entries] == ['compact#0', 'compact#1']
    assert entries[0]['cosines'] != entries[1]['cosines']  # two different models
    data = json.load(open(osp.join(out, 'gradient_confusion.json')))
    pooled = data['configs']['compact']
    assert pooled['num_runs'] == 2 and pooled['pooled']['num_pairs'] == 6
    means = [e['summary']['mean_cos'] for e in entries]
    assert pooled['mean_cos']['mean'] == pytest.approx(np.mean(means))
    assert pooled['mean_cos']['std'] == pytest.approx(np.std(means))
    assert 'compact (2 runs): mean_cos' in capsys.readouterr().out
    with open(osp.join(out, 'gradient_confusion.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_loss_landscape_tool(voc_cfgs, capsys):
    tmp, cfgs = voc_cfgs
    out = str(tmp / 'landscape')
    tool = _load_tool('loss_landscape')
    with open(osp.join(os.makedirs(out) or out, 'landscape_2d_old.png'), 'wb'):
        pass  # a plot of an earlier run into the same --out
    entries = tool.main(['--num-batches', '1', '--steps-1d', '3', '--steps-2d', '3',
                         '--span', '0.5', '--out', out], configs=copy.deepcopy(cfgs))
    printed = capsys.readouterr().out
    assert 'landscape_2d_old.png' in printed.split('note: 1 older 2-D plot(s)')[1]
    # The runners log warnings only: no environment table or config dump per config.
    assert 'System environment' not in printed and 'Config:' not in printed
    data = json.load(open(osp.join(out, 'landscape.json')))
    assert len(data['runs']) == 2
    for entry in entries:
        one, two = entry['1d'], entry['2d']
        assert one['x'] == [-0.5, 0.0, 0.5]
        assert one['center_loss'] == one['base_loss'] == two['center_loss']
        assert np.isfinite(np.array(two['losses'], dtype=float)).all()
    assert entries[1]['1d']['num_params'] > entries[0]['1d']['num_params']
    files = sorted(os.listdir(out))
    assert 'landscape_1d.png' in files
    assert sum(f.startswith('landscape_2d_') and f.endswith('.png') for f in files) == 3


@pytest.mark.slow
def test_analysis_tools_refuse_checkpoints_that_do_not_fit_before_any_work(voc_cfgs):
    """A checkpoint of another model would leave random layers: refused, naming the keys;
    a missing or corrupt file in any run is found before the first run starts."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from expand_mm.checkpoint import CheckpointError
    tmp, cfgs = voc_cfgs
    register_all_modules(init_default_scope=False)
    expanded = MODELS.build(copy.deepcopy(cfgs[1].model))
    expandnet_ckpt = str(tmp / 'expandnet_training.pth')
    torch.save(dict(state_dict=expanded.state_dict(), meta={}), expandnet_ckpt)
    tool = _load_tool('gradient_confusion')
    with pytest.raises(CheckpointError, match=r"expandnet_training.pth does not fit YOLOV3: "
                                              r"missing .*It is an ExpandNet training checkpoint"):
        tool.main(['--num-batches', '2', '--out', str(tmp / 'gc_bad'),
                   '--checkpoint', expandnet_ckpt], configs=cfgs[:1])
    corrupt = tmp / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    landscape = _load_tool('loss_landscape')
    # The first run would be fine; the second one's file is found wanting first.
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        landscape.main(['--num-batches', '1', '--steps-1d', '3', '--no-2d',
                        '--out', str(tmp / 'ls_bad'), '--checkpoint', 'none', str(corrupt)],
                       configs=cfgs)
    assert not osp.exists(tmp / 'ls_bad')
    with pytest.raises(SystemExit):
        landscape.parse_args(['x.py', '--steps-1d', '4'])


@pytest.mark.slow
def test_analysis_refuses_a_checkpoint_saved_mid_way_through_channel_planting(voc_cfgs):
    """Before the last planting stage the trained network masks its unplanted channels with
    hooks the weights do not carry: analysing the weights would analyse the full-width
    network. Refused as tools/test.py refuses it, pointing to the *_compact.pth."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from expand_mm.analysis.gradient_confusion import check_checkpoint_fits
    from expand_mm.checkpoint import CheckpointError
    tmp, cfgs = voc_cfgs
    register_all_modules(init_default_scope=False)
    compact_model = MODELS.build(copy.deepcopy(cfgs[0].model))
    planting = dict(stage=0, stages=[0.5, 1.0], widths={}, masked_entries={})
    planted = str(tmp / 'iter_1.pth')
    torch.save(dict(state_dict=compact_model.state_dict(), meta=dict(channel_planting=planting)),
               planted)
    refusal = (r"iter_1.pth was saved at channel-planting stage 1 of 2 \(50% of channels\): "
               r".*Analyse its compact copy \(\*_compact.pth")
    for name in ('gradient_confusion', 'loss_landscape'):
        out = tmp / f'{name}_planted'
        with pytest.raises(CheckpointError, match=refusal):
            _load_tool(name).main(['--num-batches', '2', '--out', str(out),
                                   '--checkpoint', planted], configs=cfgs[:1])
        assert not osp.exists(out), 'refused before any work'
    # Where the library loads checkpoints (build_mm_model_and_loader) it is refused too.
    with pytest.raises(CheckpointError, match=refusal):
        check_checkpoint_fits(compact_model, planted)
    # At the last stage the weights are the stock network: accepted.
    finished = str(tmp / 'iter_2.pth')
    torch.save(dict(state_dict=compact_model.state_dict(),
                    meta=dict(channel_planting=dict(planting, stage=1))), finished)
    check_checkpoint_fits(compact_model, finished)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['gradient_confusion', 'loss_landscape'])
def test_analysis_tools_end_a_refused_input_in_one_error_line(tmp_path, name):
    """Run as scripts, like train.py and test.py: a refused input is one ``error:`` line
    (exit code 2), whether it is a corrupt checkpoint or a dataset that is not there."""
    import subprocess
    import sys
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    tool = osp.join(ROOT, 'tools', 'analysis', f'{name}.py')
    cases = [(['--checkpoint', str(corrupt)], 'cannot read checkpoint'),
             ([], f"i.e. '{tmp_path}/data/VOCdevkit' from here")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, tool, VOC_EXPANDNET, '--num-batches', '2',
                               '--out', str(tmp_path / 'out'), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and message in last, last


DIGITS_SEG = osp.join(ROOT, 'projects', 'digits', 'configs', 'digits',
                      'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py')


def seg_cfg_with_val(data, work_dir):
    """The tiny digits-seg config (shrink_for_test drops validation) with its own val settings."""
    from mm_test_utils import load_config
    from wrapper_test_utils import tiny_cfg
    cfg = tiny_cfg(DIGITS_SEG, data, work_dir, 'seg')
    own = load_config(DIGITS_SEG)
    cfg.val_dataloader = own.val_dataloader
    cfg.val_dataloader.update(batch_size=1, num_workers=0, persistent_workers=False)
    cfg.val_dataloader.dataset.data_root = str(data / 'digits_seg') + '/'
    cfg.val_evaluator, cfg.val_cfg = own.val_evaluator, own.val_cfg
    return cfg


@pytest.mark.slow
def test_landscape_metric_at_the_centre_is_the_checkpoints_own_evaluation(tmp_path):
    """--metric: at coordinate 0 the stock ValLoop's mIoU of the checkpoint on the same images."""
    from mmengine.runner import Runner

    from wrapper_test_utils import build_model, make_digits
    data = make_digits(tmp_path / 'data')
    torch.manual_seed(3)
    model = build_model(DIGITS_SEG)
    model.init_weights()
    with torch.no_grad():  # background everywhere: a nonzero mIoU (an untrained head scores 0)
        model.decode_head.conv_seg.bias[0] = 5.0
    ckpt = str(tmp_path / 'seg.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    cfg = seg_cfg_with_val(data, tmp_path / 'work')
    tool = _load_tool('loss_landscape')
    entries = tool.main(['--num-batches', '1', '--steps-1d', '3', '--span', '0.5', '--no-2d',
                         '--metric', '--metric-samples', '2', '--checkpoint', ckpt,
                         '--out', str(tmp_path / 'landscape')], configs=[cfg])
    one = entries[0]['1d']
    assert entries[0]['metric_key'] == 'mIoU'
    assert len(one['metrics']) == 3 and all(math.isfinite(m) for m in one['metrics'])
    own = seg_cfg_with_val(data, tmp_path / 'val')
    own.load_from = ckpt
    own.val_dataloader.dataset.indices = 2
    own.experiment_name = own.visualizer.name = 'own_evaluation'
    metrics = Runner.from_cfg(own).val()
    assert one['center_metric'] == pytest.approx(metrics['mIoU'], abs=1e-9)
    assert one['center_metric'] == one['base_metric'] > 0


def test_coco_subset_keeps_the_first_images_and_only_their_annotations(tmp_path, monkeypatch):
    from data_factory import make_coco
    from expand_mm.analysis.metric import coco_subset, pick_metric_key
    ann = make_coco(str(tmp_path / 'coco'), num_images=5, split='val')
    monkeypatch.chdir(tmp_path)  # a relative out dir still gives an absolute file (datasets join
    path = coco_subset(ann, 2, 'out')  # a relative ann_file to their data_root)
    assert osp.isabs(path)
    subset = json.load(open(path))
    full = json.load(open(ann))
    assert [i['id'] for i in subset['images']] == [i['id'] for i in full['images'][:2]]
    assert subset['annotations'] == [a for a in full['annotations'] if a['image_id'] in (1, 2)]
    assert subset['categories'] == full['categories']
    assert pick_metric_key({'coco/bbox_mAP_50': 1, 'coco/bbox_mAP': 2}) == 'coco/bbox_mAP'
    assert pick_metric_key({'aAcc': 1, 'mIoU': 2}) == 'mIoU'
    with pytest.raises(ValueError, match="--metric-key 'mAP'.*aAcc"):
        pick_metric_key({'aAcc': 1}, 'mAP')
