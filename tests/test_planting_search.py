"""Channel planting as a search: ranking, budget, exact probes, resume, export of the narrow net."""
import copy
import json
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import nn

import expand_mm  # noqa: F401  (registers the hooks and PlantedSubnet)
from expand_mm.planting import (GrowingPlanter, PlantingError, PlantingSearch, SearchBudget,
                                SearchData, make_candidates, narrow_subnet, rank_candidates,
                                score_candidate)
from expand_mm.planting.search import check_candidates
from test_planting import ROOT, Chain, trained_chain

SEARCH_DET = osp.join(ROOT, 'projects', 'digits', 'configs', 'planting',
                      'plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py')


class TwoBranch(nn.Module):
    """Unit ``a`` reads input channel 0 (which the target depends on), ``b`` channel 1 (noise)."""

    def __init__(self):
        super().__init__()
        self.a = ConvModule(1, 8, 3, padding=1, norm_cfg=dict(type='BN'))
        self.b = ConvModule(1, 8, 3, padding=1, norm_cfg=dict(type='BN'))
        self.c = ConvModule(16, 8, 3, padding=1, norm_cfg=dict(type='BN'))
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x[:, :1]), self.b(x[:, 1:2])], 1)))


def toy_setup(seed=0):
    """A narrow TwoBranch (a quarter of each unit planted), trained a little, and its data."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 3, padding=1))
    gen = torch.Generator().manual_seed(1)
    x_train, x_held = torch.randn(16, 2, 12, 12, generator=gen), torch.randn(32, 2, 12, 12,
                                                                              generator=gen)
    with torch.no_grad():
        y_train, y_held = teacher(x_train[:, :1]), teacher(x_held[:, :1])
    net = TwoBranch()
    planter = GrowingPlanter(net, ['a', 'b', 'c'], 0.25)
    data = SearchData(trace=lambda: net(x_held[:2]),
                      heldout_loss=lambda grad: F.mse_loss(net(x_held), y_held),
                      train_loss=lambda: F.mse_loss(net(x_train), y_train))
    planter.start(0, data.trace)
    planter.record_spatial_sizes(data.trace)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    optimizer.register_step_post_hook(lambda *_: planter.restore_frozen())

    def train(steps):
        net.train()
        for _ in range(steps):
            optimizer.zero_grad()
            data.train_loss().backward()
            optimizer.step()

    train(30)
    return net, planter, data, train, optimizer


def held_out(net, data):
    net.eval()
    with torch.no_grad():
        return float(data.heldout_loss(False))


def test_both_probes_rank_the_informative_unit_first_and_it_measurably_helps():
    """Growing ``a`` (reads what the target depends on) beats growing ``b`` (reads noise): by
    the first-order score, by the short training probe, and in a real planting round."""
    net, planter, data, train, _ = toy_setup()
    candidates = [c for c in make_candidates(planter) if c.name in ('a', 'b')]
    for mode in ('taylor', 'train'):
        ranked = rank_candidates(planter, candidates, data, 0.5, mode, iters=10, lr=1e-2)
        assert [s.candidate.name for s in ranked] == ['a', 'b'], mode
        assert ranked[0].score > 2 * ranked[1].score, mode
    drops = {}
    for name in ('a', 'b'):
        snapshot = planter.snapshot()
        before = held_out(net, data)
        planter.plant({name: 4}, data.trace)
        train(40)
        drops[name] = before - held_out(net, data)
        planter.restore(snapshot)
    assert drops['a'] > 0 and drops['a'] > 3 * drops['b'], drops


@pytest.mark.parametrize('mode', ['taylor', 'train'])
def test_a_probe_restores_model_gradients_optimizer_and_rng_exactly(mode):
    net, planter, data, train, optimizer = toy_setup()
    data.train_loss().backward()  # gradients present: they must come back as they were
    probe_input = torch.ones(1, 2, 12, 12)
    before = net.eval()(probe_input)
    net.train()
    state = copy.deepcopy(net.state_dict())
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    frozen = {id(p): f.clone() for p, (f, _) in planter._frozen.items()}
    rng = torch.get_rng_state()
    widths, cost = planter.widths(), planter.narrow_cost()
    score = score_candidate(planter, make_candidates(planter)[0], data, 0.5, mode, iters=3,
                            lr=1e-2)
    assert score.added_params > 0 and score.gain != 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in net.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert planter.widths() == widths and planter.narrow_cost() == cost
    assert {id(p): f for p, (f, _) in planter._frozen.items()}.keys() == frozen.keys()
    assert all(torch.equal(f, frozen[id(p)]) for p, (f, _) in planter._frozen.items())
    after_opt = optimizer.state_dict()
    assert after_opt['param_groups'] == opt_state['param_groups']
    assert all(torch.equal(after_opt['state'][k]['exp_avg'], v['exp_avg'])
               for k, v in opt_state['state'].items())
    assert net.training
    torch.testing.assert_close(net.eval()(probe_input), before, rtol=0, atol=0)


def test_the_budget_stops_the_search_and_the_cost_is_the_narrow_networks():
    net, planter, data, train, _ = toy_setup()
    budget = SearchBudget.from_cfg(dict(params=0.4))
    search = PlantingSearch(planter, make_candidates(planter), budget, 0.25)
    for _ in range(20):
        if not search.step(data):
            break
        train(5)
    assert search.stopped == 'budget'
    full = planter.full_cost()['params']
    assert planter.narrow_cost()['params'] <= 0.4 * full
    # The stop is the budget's: the best helpful candidate would have exceeded it.
    last = search.record[-1]
    assert last['stopped'] == 'budget' and last['scores'] and len(search.record) > 2
    # The narrow network exported has exactly the counted parameters.
    narrow, state, _ = narrow_subnet(planter, (1, 2, 12, 12))
    assert sum(p.numel() for p in narrow.parameters()) == planter.narrow_cost()['params']
    # Each recorded step names what grew, its held-out loss and its parameter count.
    assert all({'grown', 'heldout_loss', 'params', 'widths'} <= set(e) for e in search.record)
    assert [e['params'] for e in search.record] == sorted(e['params'] for e in search.record)
    # A MAC budget, a gain threshold and a step limit stop it too.
    net, planter, data, train, _ = toy_setup()
    search = PlantingSearch(planter, make_candidates(planter),
                            SearchBudget.from_cfg(dict(macs=0.3)), 0.25)
    while search.step(data):
        pass
    assert search.stopped == 'budget' and len(search.record) > 1
    assert planter.narrow_cost()['macs'] <= 0.3 * planter.full_cost()['macs']
    net, planter, data, train, _ = toy_setup()
    search = PlantingSearch(planter, make_candidates(planter),
                            SearchBudget.from_cfg(dict(min_rel_gain=0.9)), 0.25)
    search.step(data)
    assert not search.stopped
    search.step(data)  # nothing trained in between: no gain
    assert search.stopped == 'gain'
    net, planter, data, train, _ = toy_setup()
    search = PlantingSearch(planter, make_candidates(planter),
                            SearchBudget.from_cfg(dict(max_steps=1)), 0.25)
    assert search.step(data) and not search.step(data) and search.stopped == 'max_steps'
    with pytest.raises(PlantingError, match=r"budget keys \['parms'\] are unknown"):
        SearchBudget.from_cfg(dict(parms=0.5))


def test_exported_narrow_network_computes_what_the_masked_one_does():
    net, planter, data, train, _ = toy_setup()
    planter.plant({'a': 2, 'c': 2}, data.trace)
    train(5)
    narrow, state, shapes = narrow_subnet(planter, (1, 2, 12, 12))
    assert shapes == {'convs': {'a.conv': [4, 1], 'b.conv': [2, 1], 'c.conv': [4, 6],
                                'head': [1, 4]},
                      'norms': {'a.bn': 4, 'b.bn': 2, 'c.bn': 4}}
    assert narrow.c.conv.weight.shape == (4, 6, 3, 3) and narrow.head.weight.shape == (1, 4, 1, 1)
    x = torch.randn(3, 2, 12, 12)
    net.eval()
    narrow.eval()
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), net(x), rtol=1e-5, atol=1e-6)


def test_resume_mid_search_continues_with_the_same_choices():
    def run(stop_after=None, resume_from=None):
        net, planter, data, train, _ = toy_setup()
        search = PlantingSearch(planter, make_candidates(planter),
                                SearchBudget.from_cfg(dict(params=0.7)), 0.25)
        if resume_from is not None:
            with torch.no_grad():
                net.load_state_dict(resume_from['weights'])
            search.load_state(resume_from['search'], data.trace)
        for _ in range(20):
            if stop_after is not None and planter.stage == stop_after:
                return dict(weights=copy.deepcopy(net.state_dict()),
                            search=json.loads(json.dumps(search.state())))
            if not search.step(data):
                break
            torch.manual_seed(planter.stage)  # the training after a step is reproducible
            train(5)
        return search.record

    whole = run()
    resumed = run(resume_from=run(stop_after=2))
    assert len(whole) >= 4
    assert [e['grown'] for e in resumed] == [e['grown'] for e in whole]
    assert [e['widths'] for e in resumed] == [e['widths'] for e in whole]


def test_a_residual_unit_is_refused_by_name_and_grows_with_its_partner():
    net = trained_chain(residual=True)
    x = torch.randn(2, 3, 16, 16)
    planter = GrowingPlanter(net, ['c1', 'c2'], 0.5)
    data = SearchData(trace=lambda: net(x), heldout_loss=lambda grad: net(x).square().mean())
    planter.start(0, data.trace)
    planter.record_spatial_sizes(data.trace)
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(PlantingError, match=r"unit\(s\) \['c1'\] cannot be planted on their own"):
        check_candidates(planter, make_candidates(planter), 0.25, data.trace, (1, 3, 16, 16))
    assert planter.widths() == {'c1': 4, 'c2': 4}
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    together = make_candidates(planter, [['c1', 'c2']])
    check_candidates(planter, together, 0.25, data.trace, (1, 3, 16, 16))
    assert [c.units for c in together] == [['c1', 'c2']]
    score = score_candidate(planter, together[0], data, 0.25)
    assert score.grow == {'c1': 2, 'c2': 2} and score.added_params > 0
    planter.plant(score.grow, data.trace)
    narrow, _, _ = narrow_subnet(planter, (1, 3, 16, 16))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(narrow.eval()(x), net(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(PlantingError, match="unit 'c1' is in candidate groups"):
        make_candidates(planter, [['c1', 'c2'], 'c1'])


class LinearFed(nn.Module):
    """A unit read by a linear layer after global pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='BN'))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c1(x).mean((2, 3)))


def test_a_unit_read_by_a_linear_layer_is_refused_by_name():
    net = LinearFed().eval()
    x = torch.randn(2, 3, 8, 8)
    planter = GrowingPlanter(net, ['c1'], 0.5)
    data = SearchData(trace=lambda: net(x), heldout_loss=lambda grad: net(x).square().mean())
    planter.start(0, data.trace)
    planter.record_spatial_sizes(data.trace)
    with pytest.raises(PlantingError, match=r"unit\(s\) \['c1'\] cannot be planted.*linear"):
        score_candidate(planter, make_candidates(planter)[0], data, 0.25)
    with pytest.raises(PlantingError, match=r"unit\(s\) \['c1'\] cannot be planted"):
        check_candidates(planter, make_candidates(planter), 0.25, data.trace, (1, 3, 8, 8))
    with pytest.raises(PlantingError, match='narrow network does not run'):
        narrow_subnet(planter, (1, 3, 8, 8))


def test_growing_planter_settings_are_checked():
    with pytest.raises(PlantingError, match=r'start_fraction=0 must be in \(0, 1\]'):
        GrowingPlanter(Chain(), ['c1'], 0)
    from expand_mm.hooks import ChannelPlantingSearchHook
    with pytest.raises(PlantingError, match='interval=0 must be a positive int'):
        ChannelPlantingSearchHook(include=['backbone.*'], interval=0)
    with pytest.raises(PlantingError, match='begin=0 must be a positive int'):
        ChannelPlantingSearchHook(include=['backbone.*'], begin=0)
    with pytest.raises(PlantingError, match="probe='grad' must be one of"):
        ChannelPlantingSearchHook(include=['backbone.*'], probe='grad')
    with pytest.raises(PlantingError, match=r"heldout keys \['size'\] are unknown"):
        ChannelPlantingSearchHook(include=['backbone.*'], heldout=dict(size=3))


def search_cfg(digits_data, tmp_path, work, max_iters=6):
    from test_distiller import TEACHER_DET, teacher_checkpoint
    from wrapper_test_utils import tiny_cfg
    cfg = tiny_cfg(SEARCH_DET, digits_data, tmp_path / work, 'det', max_iters=max_iters)
    cfg.model.teacher_ckpt = teacher_checkpoint(TEACHER_DET, tmp_path / 'teacher.pth')
    hook = cfg.custom_hooks[0]
    hook.update(begin=2, interval=2, heldout=dict(num_samples=2, batch_size=2))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, by_epoch=False)
    return cfg


@pytest.mark.slow
def test_search_config_in_the_runner_exports_a_subnet_the_stock_api_loads(digits_data,
                                                                          tmp_path):
    """The digits search config in the stock Runner: held-out split carved from training, a
    record and plot, and planted_subnet.py / .pth that init_detector builds and loads strictly,
    predicting what the masked student predicts; resuming mid-search repeats its choices."""
    from mmdet.apis import init_detector
    from mmengine.runner import Runner
    cfg = search_cfg(digits_data, tmp_path, 'work')
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    work = tmp_path / 'work'
    hook = next(h for h in runner.hooks if type(h).__name__ == 'ChannelPlantingSearchHook')
    assert len(runner.train_loop.dataloader.dataset) == 2  # 4 training images, 2 held out
    record = json.loads((work / 'planting_search.json').read_text())
    assert len(record['steps']) == 2 and (work / 'planting_search.png').is_file()
    assert all(step['grown'] for step in record['steps'])
    assert record['final']['params'] > record['steps'][0]['params']
    # The narrow network: built by the stock API from the written config, loaded strictly.
    model = init_detector(str(work / 'planted_subnet.py'), str(work / 'planted_subnet.pth'),
                          device='cpu')
    weights = torch.load(work / 'planted_subnet.pth')['state_dict']
    model.load_state_dict(weights, strict=True)
    assert sum(p.numel() for p in model.parameters()) == record['final']['params']
    assert type(model).__name__ == 'YOLOV3' and model.dataset_meta['classes'][0] == '0'
    student = runner.model.student.eval()  # masks still on: the network that was trained
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want, got = student(x, mode='tensor'), model.eval()(x, mode='tensor')
    from expand_mm.verification import flatten_tensors
    for w, g in zip(flatten_tensors(want), flatten_tensors(got)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert hook.planter.narrow_cost()['params'] == record['final']['params']

    # Resume from iteration 3 (after the first step): the second step chooses the same.
    cfg.resume = True
    cfg.load_from = str(work / 'iter_3.pth')
    cfg.work_dir = str(tmp_path / 'resumed')
    Runner.from_cfg(cfg).train()
    resumed = json.loads((tmp_path / 'resumed' / 'planting_search.json').read_text())
    assert [s['grown'] for s in resumed['steps']] == [s['grown'] for s in record['steps']]
    assert resumed['final']['widths'] == record['final']['widths']


@pytest.mark.slow
def test_the_first_step_waits_for_begin(digits_data, tmp_path):
    """begin=3, interval=2: the narrow network trains three iterations before the first
    step, then a step every two (iterations 3 and 5 of 7)."""
    from mmengine.runner import Runner
    cfg = search_cfg(digits_data, tmp_path, 'work', max_iters=7)
    cfg.custom_hooks[0].update(begin=3, export=False)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=7, by_epoch=False)
    Runner.from_cfg(cfg).train()
    record = json.loads((tmp_path / 'work' / 'planting_search.json').read_text())
    assert [step['iter'] for step in record['steps']] == [3, 5]


YOLOV3_SEARCH = osp.join(ROOT, 'configs', 'planting', 'plant-search-p50_kd-yolov3-d53_yolov3_'
                         'mobilenetv2_8xb24-320-300e_coco.py')
UNET_SEARCH = osp.join(ROOT, 'projects', 'digits', 'configs', 'planting',
                       'plant-search-p50_kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_'
                       'digits-seg-64x64.py')


@pytest.mark.slow
@pytest.mark.parametrize('path, scope, units, candidates', [
    # three detection blocks, two laterals, three bridges
    (YOLOV3_SEARCH, 'mmdet', ('neck.', 'bbox_head.convs_bridge.'), 3 + 2 + 3),
    # eight encoder and six decoder convs, three upsampling convs, the head's conv
    (UNET_SEARCH, 'mmseg', ('backbone.', 'decode_head.'), 18),
], ids=['yolov3-mobilenetv2', 'digits-unet'])
def test_search_configs_student_can_grow_every_candidate_and_export_it(path, scope, units,
                                                                      candidates, tmp_path):
    """A search config's hook builds, every candidate of its student can grow on its own and
    its narrow network computes what the masked one does (no residual add, no depthwise
    reader), the exported config and weights build and load strictly through the stock
    init_detector / init_model, and the expand_mm hooks sit in default_hooks."""
    from mmengine.registry import HOOKS, MODELS, DefaultScope
    from mm_test_utils import load_config
    cfg = load_config(path)
    assert set(cfg.default_hooks) >= {'expand_load', 'expand_contract', 'expand_check'}
    assert cfg.model.type == 'Distiller'
    hook = HOOKS.build(copy.deepcopy(cfg.custom_hooks[-1]))
    student_cfg = dict(cfg.model.student)
    student_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    with DefaultScope.overwrite_default_scope(scope):
        student = MODELS.build(student_cfg).eval()
    planter = GrowingPlanter(student, hook.include, hook.start_fraction)
    x = torch.randn(1, 3, 64, 64)
    trace = lambda: student(x, mode='tensor')  # noqa: E731
    planter.start(0, trace)
    planter.record_spatial_sizes(trace)
    found = make_candidates(planter, hook.candidate_groups)
    assert len(found) == candidates
    assert all(p.startswith(units) for p in planter.unit_paths())
    check_candidates(planter, found, hook.step_fraction, trace, (1, 3, 64, 64))
    planter.plant({p: 2 for p in found[0].units}, trace)
    narrow, state, shapes = narrow_subnet(planter, (1, 3, 64, 64))
    assert sum(p.numel() for p in narrow.parameters()) == planter.narrow_cost()['params']
    # The exported config builds through the stock API and the weights load strictly.
    from expand_mm.models.deployable import deployable_model_cfg
    from expand_mm.planting import subnet_model_cfg
    cfg.model = subnet_model_cfg(deployable_model_cfg(cfg.model), shapes)
    cfg.dump(str(tmp_path / 'subnet.py'))
    torch.save(dict(state_dict=state, meta=dict(dataset_meta=dict(classes=['x']))),
               tmp_path / 'subnet.pth')
    if scope == 'mmdet':
        from mmdet.apis import init_detector as init
    else:
        from mmseg.apis import init_model as init
    stock_api = init(str(tmp_path / 'subnet.py'), str(tmp_path / 'subnet.pth'), device='cpu')
    stock_api.load_state_dict(state, strict=True)
    assert type(stock_api).__name__ == type(student).__name__
    from expand_mm.verification import flatten_tensors
    with torch.no_grad():
        pairs = zip(flatten_tensors(stock_api.eval()(x, mode='tensor')),
                    flatten_tensors(student(x, mode='tensor')))
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_heldout_split_is_carved_inside_a_repeat_dataset(digits_data, tmp_path):
    """mmdet's YOLOv3 configs repeat their training set: the held-out samples are taken out
    of the inner dataset, and the rest is repeated as before."""
    from mmengine.runner import Runner
    cfg = search_cfg(digits_data, tmp_path, 'work', max_iters=2)
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=3,
                                        dataset=cfg.train_dataloader.dataset)
    cfg.custom_hooks[0].update(begin=1, interval=1, export=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    dataset = runner.train_loop.dataloader.dataset
    assert type(dataset).__name__ == 'RepeatDataset' and len(dataset) == 3 * 2
    hook = next(h for h in runner.hooks if type(h).__name__ == 'ChannelPlantingSearchHook')
    held = {s.img_path for b in hook.heldout for s in b['data_samples']}
    kept = {dataset.dataset[i]['data_samples'].img_path for i in range(2)}
    assert len(held) == 2 and not held & kept
    assert not (tmp_path / 'work' / 'planted_subnet.pth').exists()
