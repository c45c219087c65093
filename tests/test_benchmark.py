"""Smoke test of ``tools/benchmark.py``: it runs on a tiny setting and writes every figure.

Timings are not asserted (they are measurements, not properties); only that
each figure exists, is finite and carries its ratio to the compact model, and
that the deployed model has exactly the compact size.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'benchmark.py'
CONFIGS = ROOT / 'configs'
DET_CONFIG = CONFIGS / 'expandnet' / 'expandnet-cl-r4_yolo-lite_8xb16-100e_voc0712.py'
SEG_CONFIG = (CONFIGS / 'expandnet' /
              'expandnet-cl-r4_unet-s5-d16-c16-fcn_4xb4-160k_cityscapes-512x1024.py')


def tiny(iters: int) -> list[str]:
    """Arguments of a seconds-long run."""
    return ['--iters', str(iters), '--warmup', '0', '--contract-iters', '1', '--img-size',
            '64', '--batch-size', '1', '--device', 'cpu']


EXPECTED_FIGURES = {
    (f'train_step{t}_time', v) for t in ('', '_cpu')
    for v in ('compact', 'explicit', 'online')} | {
    (f'train_{k}_memory', v) for k in ('peak', 'step_peak', 'state')
    for v in ('compact', 'explicit', 'online')} | {
    (f'inference{t}_time', v) for t in ('', '_cpu')
    for v in ('compact', 'online', 'contracted')} | {
    ('contract_time', 'contract_model')} | {
    ('params', v) for v in ('compact', 'training', 'deployed')} | {
    ('macs_per_image', v) for v in ('compact', 'training_explicit', 'deployed')} | {
    ('forward_macs_per_step', v) for v in ('compact', 'explicit', 'online')} | {
    ('composition_macs_per_step', 'online')}


def _load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_result(result: dict, explicit_trained: bool = True) -> None:
    """Every figure present, finite, with its ratio; contraction exact in size.

    Without ``explicit_trained`` (``--explicit-iters 0``) the explicit train
    step's time and memory are absent, and only they.
    """
    figures = {(r['name'], r['variant']): r for r in result['figures']}
    expected = EXPECTED_FIGURES if explicit_trained else {
        (name, variant) for name, variant in EXPECTED_FIGURES
        if not (name.startswith('train_') and variant == 'explicit')}
    assert set(figures) == expected
    for key, row in figures.items():
        assert math.isfinite(row['value']) and row['value'] >= 0, key
        if key[0] == 'contract_time':
            assert row['ratio'] is None
        else:
            assert math.isfinite(row['ratio']), key
        if key[1] == 'compact':
            assert row['ratio'] == pytest.approx(1.0)
    assert figures[('params', 'deployed')]['value'] == figures[('params', 'compact')]['value']
    assert figures[('params', 'training')]['ratio'] > 1
    assert figures[('macs_per_image', 'deployed')]['ratio'] == 1.0
    assert figures[('macs_per_image', 'training_explicit')]['ratio'] > 1
    assert figures[('composition_macs_per_step', 'online')]['value'] > 0
    assert result['contraction_error']['max_rel'] < 1e-4
    assert all(math.isfinite(v) for v in result['final_losses'].values())
    for name in ('device', 'torch', 'threads'):
        assert name in result['env']
    assert result['settings']['img_size'] == [64, 64]
    assert result['memory_measure'].startswith('cpu: ')
    assert {'online_train_time', 'online_train_peak_memory', 'contracted_same_params',
            'contracted_same_macs', 'contract_under_1s', 'online_train_cpu_time'
            } <= set(result['targets'])
    assert result['targets']['contracted_same_params']['ok']
    assert result['targets']['contracted_same_macs']['ok']
    # The memory floor is the online state + the larger of the compact step peak
    # and the online gradients: the measured online peak cannot be below it,
    # and it is above 1 (the factors exist).
    memory = result['targets']['online_train_peak_memory']
    assert 1.0 < memory['floor'] <= memory['ratio'] + 1e-9
    mib = result['train_memory_mib']
    assert mib['online']['grad_mib'] > mib['compact']['grad_mib'] > 0
    assert memory['floor'] * mib['compact']['peak_mib'] >= (
        mib['online']['grad_mib'] + mib['online']['state_mib'] - 1e-9)
    assert result['targets']['online_train_time']['floor_by_macs'] > 1.0


@pytest.mark.slow
def test_cli_on_a_detector(tmp_path):
    out = tmp_path / 'bench.json'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(TOOL), str(DET_CONFIG), *tiny(2), '--explicit-iters', '1',
                           '--out', str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ('command:', 'threads=', 'torch=', 'train_step_time', 'x compact',
                 f'wrote {out}'):
        assert text in proc.stdout
    result = json.loads(out.read_text())
    check_result(result)
    assert result['config'] == str(DET_CONFIG)
    samples = {v: len(result['train_step_ms']['wall'][v]['samples']) for v in
               ('compact', 'explicit', 'online')}
    assert samples == dict(compact=2, explicit=1, online=2)
    assert str(DET_CONFIG) in result['command']


@pytest.mark.slow
def test_segmentor_in_process(tmp_path):
    tool = _load_tool()
    out = tmp_path / 'seg.json'
    assert tool.main([str(SEG_CONFIG), *tiny(1), '--out', str(out), '--explicit-iters', '0',
                      '--cfg-options', 'model.ratio=2']) == 0
    result = json.loads(out.read_text())
    check_result(result, explicit_trained=False)
    assert set(result['train_memory_mib']) == {'compact', 'online'}
    # --cfg-options reach the model built, and the JSON says what was run.
    assert result['expansion']['ratio'] == 2
    assert result['settings']['cfg_options'] == {'model.ratio': 2}


@pytest.mark.slow
def test_a_misspelled_cfg_option_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(SEG_CONFIG), *tiny(1),
                           '--out', str(tmp_path / 'x.json'), '--cfg-options', 'model.ratioo=2'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and "'ratioo'" in last and "'ratio'" in last, last
    assert not (tmp_path / 'x.json').exists()


def test_defaults_are_the_issue_setting():
    tool = _load_tool()
    args = tool.parse_args([])
    assert Path(args.config).resolve() == (
        CONFIGS / 'expandnet' / 'expandnet-cl-r4_yolov3-mobilenetv2_8xb24-320-300e_coco.py')
    assert not tool.apply_budget(tool.load_config(args.config), args)  # no budget: 8, 320x320
    assert (args.batch_size, args.img_size) == (8, [320, 320])
    assert args.out.endswith(os.path.join(
        'benchmark', 'expandnet-cl-r4_yolov3-mobilenetv2_8xb24-320-300e_coco.json'))


def test_refuses_a_compact_config():
    tool = _load_tool()
    with pytest.raises(ValueError, match="model.type is 'YOLOV3'.*ExpandNet"):
        tool.load_config(str(CONFIGS / 'yolo_lite' / 'yolo-lite_8xb16-100e_voc0712.py'))


def test_a_budget_is_planned_at_the_configs_training_batch_and_size_unless_overridden():
    tool = _load_tool()
    args = tool.parse_args([str(DET_CONFIG), '--budget', '1.2'])
    cfg = tool.load_config(args.config)
    assert tool.apply_budget(cfg, args)
    assert (args.batch_size, args.img_size) == (16, [224, 224])  # the VOC config's training
    assert cfg.model.budget == dict(train_step=1.2, train_memory=1.2, batch_size=16,
                                    img_size=(224, 224))
    args = tool.parse_args([str(DET_CONFIG), '--budget', '1.2', '1.3', '--batch-size', '2',
                            '--img-size', '64'])
    cfg = tool.load_config(args.config)
    tool.apply_budget(cfg, args)
    assert cfg.model.budget == dict(train_step=1.2, train_memory=1.3, batch_size=2,
                                    img_size=(64, 64))
    with pytest.raises(SystemExit):
        tool.parse_args([str(DET_CONFIG), '--budget', '1.1', '1.1', '1.1'])


@pytest.mark.slow
def test_a_budgeted_run_prints_predicted_beside_measured(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / 'budget.json'
    assert tool.main([str(DET_CONFIG), *tiny(1), '--explicit-iters', '0', '--budget', '1.5',
                      '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    check_result(result, explicit_trained=False)
    check = result['budget']
    assert check['budget'] == dict(train_step=1.5, train_memory=1.5)
    assert 1.0 < check['predicted']['train_step'] <= 1.5
    assert 1.0 < check['predicted']['train_memory'] <= 1.5
    figures = {(r['name'], r['variant']): r['ratio'] for r in result['figures']}
    assert check['measured']['train_step'] == figures[('train_step_time', 'online')]
    assert check['measured']['train_memory'] == figures[('train_peak_memory', 'online')]
    assert set(check['ratios'].values()) <= {1, 2, 4} and max(check['ratios'].values()) > 1
    printed = capsys.readouterr().out
    assert 'budget train_step <= 1.5: predicted' in printed and 'budget plan (' in printed
