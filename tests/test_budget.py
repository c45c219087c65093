"""Per-layer ratios, the training-memory prediction and its cap, and the budget planner."""
import argparse
import collections
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, DefaultScope
from torch import nn

import expand_mm
from expand_mm import surgery
from expand_mm.budget import (Budget, CompactCost, LayerOption, choose_ratios,
                              expand_within_budget, plan_expansion, predict)
from expand_mm.cost import training_memory
from expand_mm.errors import ConfigError
from expand_mm.surgery import ExpansionSettings, count_params, expand_model
from mm_test_utils import load_config
from test_integration import assert_same_detections, keep_all_detections

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BUDGET_CONFIG = osp.join(ROOT, 'projects', 'digits', 'configs', 'budget',
                         'expandnet-cl-budget1.10_yolo-lite_1xb16-900i_digits-det-64x64.py')
COMPACT_CONFIG = osp.join(ROOT, 'projects', 'digits', 'configs', 'digits',
                          'yolo-lite_1xb16-900i_digits-det-64x64.py')


def three_convs() -> nn.Module:
    """backbone.0 (3->8), backbone.1 (8->16), head (16->16): 3x3 convs with bias."""
    torch.manual_seed(0)
    return nn.Sequential(collections.OrderedDict(
        backbone=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)),
        head=nn.Conv2d(16, 16, 3, padding=1)))


def cl_params(m: int, n: int, k: int, r: int) -> int:
    """Parameters of a CL chain 1x1 (m->rm), kxk (rm->rn), 1x1 (rn->n), each with a bias."""
    return m * r * m + r * m + r * m * r * n * k * k + r * n + r * n * n + n


# ----------------------------------------------------------------- per-layer ratios

def test_ratio_rules_first_match_wins_and_the_report_names_each_layers_ratio():
    model = three_convs()
    report = expand_model(model, ratio=[('backbone.1', 2), ('backbone.*', 4), ('head', 1)])
    assert [(r.path, r.ratio) for r in report.layers] == [('backbone.0', 4), ('backbone.1', 2)]
    assert [r.expanded_params for r in report.layers] == [cl_params(3, 8, 3, 4),
                                                          cl_params(8, 16, 3, 2)]
    assert dict(report.skipped)['head'].startswith('ratio 1')
    assert type(model.head) is nn.Conv2d
    text = str(report)
    assert 'ratio 2 (1 layer), 4 (1 layer)' in text
    assert report.to_dict()['ratio'] == [['backbone.1', 2], ['backbone.*', 4], ['head', 1]]


def test_a_mapping_takes_the_most_specific_pattern_whatever_its_key_order():
    for mapping in ({'*': 4, 'backbone.1': 2}, {'backbone.1': 2, '*': 4}):
        settings = ExpansionSettings(ratio=mapping)
        assert [settings.ratio_for(p) for p in ('backbone.0', 'backbone.1', 'head')] == [4, 2, 4]


def test_a_layer_no_ratio_pattern_matches_stays_compact():
    model = three_convs()
    report = expand_model(model, ratio={'backbone.*': 2})
    assert [r.path for r in report.layers] == ['backbone.0', 'backbone.1']
    assert type(model.head) is nn.Conv2d


def test_ratio_patterns_survive_a_config_dump_and_cfg_options(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("model = dict(ratio={'*': 4, 'backbone.1': 2})\n")
    cfg = Config.fromfile(str(path))
    dumped = tmp_path / 'dumped.py'
    cfg.dump(str(dumped))  # MMEngine sorts dict keys here: the mapping's meaning must not change
    for loaded in (cfg, Config.fromfile(str(dumped))):
        settings = ExpansionSettings(ratio=loaded.model.ratio)
        assert [settings.ratio_for(p) for p in ('backbone.0', 'backbone.1')] == [4, 2]
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(
        ['--cfg-options', 'model.ratio=[(backbone.1,2),(*,4)]']).cfg_options
    cfg.merge_from_dict(options)
    settings = ExpansionSettings(ratio=cfg.model.ratio)
    assert [settings.ratio_for(p) for p in ('backbone.0', 'backbone.1')] == [4, 2]


def test_a_ratio_pattern_that_matches_no_layer_is_refused_with_the_existing_paths():
    with pytest.raises(ConfigError, match=r"ratio pattern 'backbone\.stages\.5\.\*' matches no "
                                          r'expandable layer.*backbone\.\*'):
        expand_model(three_convs(), ratio={'backbone.stages.5.*': 2, '*': 4})


@pytest.mark.parametrize('ratio, match', [
    ([('backbone.*', 0)], r"ratio of pattern 'backbone.\*': ratio=0 must be an integer >= 1"),
    ([('backbone.*',)], r"\('backbone.\*',\) is not a \(pattern, ratio\) pair"),
    ([], r'must be an integer, a mapping'),
])
def test_malformed_ratio_rules_are_refused_in_one_line(ratio, match):
    with pytest.raises(ConfigError, match=match):
        ExpansionSettings(ratio=ratio)


# ------------------------------------------------------- memory predicted before building

def test_the_predicted_training_state_is_what_expansion_builds():
    model = three_convs()
    report = expand_model(model, ratio={'backbone.*': 2, 'head': 4})
    memory = report.predicted_memory
    assert memory.params == count_params(model)
    assert memory.param_bytes == memory.grad_bytes == memory.optimizer_bytes == 4 * memory.params
    assert memory.checkpoint_bytes == 8 * memory.params
    assert 'predicted training state' in str(report)


def test_ratio_64_beyond_the_available_memory_is_refused_before_anything_is_allocated(
        monkeypatch):
    model = three_convs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 2 MiB available; r=64 would need 173 MiB for this toy model.
    monkeypatch.setattr(surgery, 'available_memory_bytes', lambda device: 2 * 1024 ** 2)

    def no_allocation(*args, **kwargs):
        raise AssertionError('an expanded layer was built')

    monkeypatch.setattr(surgery, '_expanded_twin', no_allocation)

    def training_bytes(r):  # parameters, gradients, momentum
        return 3 * 4 * sum(cl_params(m, n, 3, r) for m, n in ((3, 8), (8, 16), (16, 16)))

    fits = max(r for r in range(2, 64) if training_bytes(r) <= 2 * 1024 ** 2)
    assert fits == 6 and training_bytes(64) / 1024 ** 2 == pytest.approx(172.8, abs=0.05)
    with pytest.raises(ConfigError, match=(
            r'would need about 172\.8 MiB to train \(15,102,760 parameters.* more than the '
            rf'2\.0 MiB of memory available on cpu; ratio={fits} would fit')):
        expand_model(model, ratio=64)
    assert not expand_mm.expanded_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_max_train_memory_caps_the_prediction_and_names_the_largest_ratio_that_fits():
    fits = training_memory(count_params(three_convs()) - (224 + 1168 + 2320)
                           + cl_params(3, 8, 3, 8) + cl_params(8, 16, 3, 8)
                           + cl_params(16, 16, 3, 8), 0, 0, 0)
    cap_gib = 3 * fits.param_bytes / 1024 ** 3  # params, grads, momentum at r=8
    with pytest.raises(ConfigError, match=r'of max_train_memory; ratio=8 would fit'):
        expand_model(three_convs(), ratio=9, max_train_memory=cap_gib * 1.0001)
    expand_model(three_convs(), ratio=8, max_train_memory=cap_gib * 1.0001)
    with pytest.raises(ConfigError, match='max_train_memory=0 must be a positive number'):
        ExpansionSettings(max_train_memory=0)


# --------------------------------------------------------------------- the planner

def hand_costed():
    """A compact step of 1000 MACs, 600 B of activations, 100 float32 parameters (SGD momentum:
    400 B each of parameters, gradients, state; peak 1800 B); two layers with known costs."""
    compact = CompactCost(step_macs=1000, activation_bytes=600,
                          memory=training_memory(100, 100, 0, optimizer_slots=1))
    options = [LayerOption('a', 'cl', 10, True, {1: 10, 2: 30, 4: 110}, {1: 0, 2: 10, 4: 40}),
               LayerOption('b', 'cl', 20, True, {1: 20, 2: 60, 4: 220}, {1: 0, 2: 30, 4: 120})]
    return compact, options


def test_the_planner_takes_the_cheapest_steps_that_fit_as_computed_by_hand():
    compact, options = hand_costed()
    assert compact.peak_bytes == 1800
    budget = Budget(train_step=1.10, train_memory=1.5, batch_size=1, img_size=8)
    # Headroom: 100 MACs, 900 B; each added parameter costs 8 B (itself and its momentum;
    # the gradients stay below the compact step's 1000 B peak). Step costs (max share):
    # a 1->2: 10 MACs, 160 B -> 0.178;  b 1->2: 30, 320 B -> 0.356;  a 2->4: 30, 640 B -> 0.711
    # (then 1120 B > 900: refused);  b 2->4: 90 MACs -> 130 > 100: refused.
    ratios = choose_ratios(compact, options, budget)
    assert ratios == {'a': 2, 'b': 2}
    train_step, train_memory, memory = predict(compact, options, ratios, 1)
    assert train_step == pytest.approx(1040 / 1000)
    assert memory.params == 160
    assert train_memory == pytest.approx((640 + 640 + 1000) / 1800)
    # Only the time limit: b then a go to 2 (10 + 30 MACs), a to 4 (70); b to 4 would be 160.
    assert choose_ratios(compact, options, Budget(train_step=1.10, batch_size=1,
                                                  img_size=8)) == {'a': 4, 'b': 2}


def test_gradients_count_when_they_exceed_the_compact_step_peak():
    compact, options = hand_costed()
    compact = CompactCost(compact.step_macs, 0, compact.memory)  # step peak = 400 B of grads
    _, train_memory, _ = predict(compact, options, {'a': 2, 'b': 1}, 1)
    assert train_memory == pytest.approx(3 * 480 / 1200)


def test_a_budget_below_the_cheapest_single_expansion_names_the_smallest_reachable_figure():
    compact, options = hand_costed()
    budget = Budget(train_step=1.005, train_memory=1.5, batch_size=1, img_size=8)
    with pytest.raises(ConfigError, match=r'budget train_step=1.005, train_memory=1.5 is below '
                                          r'.* smallest reachable figures are train_step 1\.0100x '
                                          r'\(a at ratio 2\) and train_memory 1\.0889x \(a at '
                                          r'ratio 2\)'):
        choose_ratios(compact, options, budget)


@pytest.mark.parametrize('budget, match', [
    (dict(train_step=0.9, batch_size=1, img_size=8), 'train_step=0.9 must be a ratio >= 1'),
    (dict(batch_size=1, img_size=8), 'give train_step and/or train_memory'),
    (dict(train_step=1.1, img_size=8), r'batch_size=None .*_base_\.train_dataloader'),
    (dict(train_step=1.1, batch_size=1), 'img_size=None must be the training input size'),
    (dict(train_step=1.1, batch_size=1, img_size=8, ratios=(1,)), 'allows no ratio above 1'),
    (dict(train_stp=1.1), "unknown key 'train_stp' \\(did you mean 'train_step'\\?\\)"),
])
def test_bad_budgets_are_refused_in_one_line(budget, match):
    with pytest.raises(ConfigError, match=match):
        Budget.of(budget)


def test_a_planned_expansion_matches_its_prediction_and_refuses_a_ratio_besides_it():
    model = three_convs()
    budget = dict(train_step=1.5, train_memory=1.5, batch_size=2, img_size=16)
    report = expand_within_budget(model, budget, include=['backbone.*', 'head'])
    plan = report.plan
    assert [(r.path, r.ratio) for r in report.layers] == [
        (p.path, p.ratio) for p in plan.layers if p.ratio > 1]
    assert plan.train_step <= 1.5 and plan.train_memory <= 1.5
    assert plan.memory.params == count_params(model) == report.predicted_memory.params
    composition = sum(layer.composition_macs() for _, layer in expand_mm.expanded_layers(model))
    assert plan.train_step == pytest.approx(1 + composition / plan.compact.step_macs)
    assert 'budget plan (train_step <= 1.500x' in str(plan)
    with pytest.raises(ConfigError, match='budget given together with ratio=2'):
        plan_expansion(three_convs(), ExpansionSettings(ratio=2), budget)


@pytest.mark.slow
def test_a_planned_expandnet_contracts_exactly_and_round_trips_through_the_stock_api(tmp_path):
    from mmdet.apis import inference_detector, init_detector

    cfg = load_config(BUDGET_CONFIG)
    assert cfg.model.budget.batch_size == 16  # read from the base config's train_dataloader
    keep_all_detections(cfg.model)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        trained = MODELS.build(cfg.model)
    ratios = {r.ratio for r in trained.expansion_report.layers}
    assert ratios <= {2, 4} and trained.expansion_report.plan.train_memory <= 1.10
    trained.eval()
    x = torch.rand(1, 3, 64, 64)
    compact = expand_mm.contract_model(trained, verify_inputs=x,
                                       forward_fn=lambda m, t: m(t, mode='tensor'))
    training_ckpt, compact_ckpt = tmp_path / 'iter_1.pth', tmp_path / 'iter_1_compact.pth'
    torch.save({'state_dict': trained.state_dict(), 'meta': {}}, training_ckpt)
    torch.save({'state_dict': compact.state_dict(), 'meta': {}}, compact_ckpt)
    compact_cfg = load_config(COMPACT_CONFIG)
    keep_all_detections(compact_cfg.model)
    deployed = init_detector(compact_cfg, str(compact_ckpt), device='cpu')
    # cfg_options={}: init_detector otherwise reads model.backbone, which an ExpandNet nests
    reloaded = init_detector(cfg, str(training_ckpt), device='cpu', cfg_options={})
    assert not expand_mm.expanded_layers(deployed) and expand_mm.expanded_layers(reloaded)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert_same_detections(inference_detector(deployed, image).pred_instances,
                           inference_detector(reloaded, image).pred_instances)


def test_counting_macs_in_train_mode_leaves_batch_norm_statistics_alone():
    from expand_mm.cost import count_macs
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (8, 8)) >= 3 * 4 * 9 * 64  # at least the conv's
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
