"""The study tool (tools/analysis/study.py) and the schedule scaling it uses."""
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from expand_mm.errors import ConfigError
from expand_mm.schedule import scale_schedule
from wrapper_test_utils import ROOT, load_tool

DET_CONFIGS = ROOT / 'projects/digits/configs/digits'
COMPACT = DET_CONFIGS / 'yolo-lite_1xb16-900i_digits-det-64x64.py'
EXPANDNET = DET_CONFIGS / 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
SEG_COMPACT = DET_CONFIGS / 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'
SEG_EXPANDNET = DET_CONFIGS / 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'


@pytest.fixture(scope='module')
def study_tool():
    return load_tool('analysis/study')


def schedule_cfg() -> Config:
    return Config(dict(
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=900, val_interval=300),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=450)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, begin=0, end=50, by_epoch=False),
            dict(type='CosineAnnealingLR', T_max=850, begin=50, end=900, by_epoch=False),
            dict(type='MultiStepLR', milestones=[600, 800], by_epoch=False)]))


def test_scale_schedule_stretches_every_step_count_together():
    cfg = schedule_cfg()
    assert scale_schedule(cfg, 2) == 1800
    warmup, cosine, steps = cfg.param_scheduler
    assert (warmup.begin, warmup.end) == (0, 100)
    assert (cosine.T_max, cosine.begin, cosine.end) == (1700, 100, 1800)
    assert steps.milestones == [1200, 1600]
    assert cfg.train_cfg.val_interval == 600
    assert cfg.default_hooks.checkpoint.interval == 900


def test_scale_schedule_moves_an_open_end_to_the_new_length():
    cfg = schedule_cfg()
    cfg.param_scheduler[1].end = 2 ** 31  # mmengine's "until the end"
    scale_schedule(cfg, 0.5)
    assert cfg.param_scheduler[1].end == 450 and cfg.train_cfg.max_iters == 450


@pytest.mark.parametrize('factor', [0, -1, True, 'x2'])
def test_scale_schedule_refuses_a_bad_factor(factor):
    with pytest.raises(ConfigError, match='positive number'):
        scale_schedule(schedule_cfg(), factor)


def write_study(path, **entries) -> str:
    text = '\n'.join(f'{key} = {value!r}' for key, value in entries.items())
    path.write_text(text + '\n')
    return str(path)


def test_study_file_naming_an_unknown_config_in_per_config_is_refused(study_tool, tmp_path):
    study = write_study(tmp_path / 'study.py', configs=dict(compact=str(COMPACT)),
                        axes=dict(width={'half': dict(per_config=dict(expandnet={}))}),
                        metric='coco/bbox_mAP')
    with pytest.raises(ConfigError, match=r"per_config names \['expandnet'\]"):
        study_tool.load_study(study)


def test_study_file_without_a_metric_is_refused(study_tool, tmp_path):
    study = write_study(tmp_path / 'study.py', configs=dict(compact=str(COMPACT)))
    with pytest.raises(ConfigError, match='metric must name'):
        study_tool.load_study(study)


def test_grid_is_configs_times_levels_times_seeds(study_tool, tmp_path):
    study = study_tool.load_study(write_study(
        tmp_path / 'study.py', configs=dict(a=str(COMPACT), b=str(EXPANDNET)),
        axes=dict(schedule={'1x': dict(schedule_scale=1), '2x': dict(schedule_scale=2)}),
        seeds=[0, 1, 2], metric='coco/bbox_mAP'))
    runs = study.runs()
    assert len(runs) == 2 * 2 * 3 and len({r.run_id for r in runs}) == 12
    cfg = study_tool.run_config(study, runs[3], str(tmp_path / 'run'))  # a, 2x, seed 0
    assert dict(runs[3].levels) == {'schedule': '2x'} and runs[3].seed == 0
    assert cfg.train_cfg.max_iters == 1800 and cfg.randomness.seed == 0


def test_table_pools_seeds_per_cell_with_mean_and_sample_spread(study_tool, tmp_path):
    study = study_tool.load_study(write_study(
        tmp_path / 'study.py', configs=dict(a=str(COMPACT), b=str(EXPANDNET)),
        seeds=[0, 1, 2], metric='coco/bbox_mAP', metric_scale=100))
    values = {('a', 0): 0.30, ('a', 1): 0.32, ('a', 2): 0.34, ('b', 0): 0.40}
    results = {r.run_id: dict(value=values[(r.config_name, r.seed)])
               for r in study.runs() if (r.config_name, r.seed) in values}
    rows = {row['cell']: row for row in study_tool.summarize(study, results)}
    assert rows[('a',)]['mean'] == pytest.approx(32.0)
    assert rows[('a',)]['std'] == pytest.approx(2.0)
    assert rows[('b',)]['mean'] == pytest.approx(40.0) and rows[('b',)]['std'] == 0.0
    table = study_tool.format_table(study, list(rows.values()))
    assert '| a | 3 | 32.00 ± 2.00 | 30.00 | 32.00 | 34.00 |' in table
    assert '| b | 1 | 40.00 ± 0.00 | 40.00 | — | — |' in table


def tiny_seg_options(digits_data) -> dict:
    root = str(digits_data / 'digits_seg') + '/'
    options = {f'{loader}.{key}': value
               for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
               for key, value in (('dataset.data_root', root), ('num_workers', 0),
                                  ('persistent_workers', False), ('batch_size', 2))}
    options['default_hooks.logger.interval'] = 1
    return options


@pytest.mark.slow
def test_tiny_grid_trains_tabulates_and_resumes_without_rerunning(study_tool, digits_data,
                                                                    tmp_path):
    # A two-cell grid shrunk to 2 iterations through the study's own schedule scaling.
    study = study_tool.load_study(write_study(
        tmp_path / 'study.py',
        configs=dict(compact=str(SEG_COMPACT), expandnet=str(SEG_EXPANDNET)),
        axes=dict(schedule={'short': dict(schedule_scale=2 / 800)}), seeds=[0],
        metric='mIoU', cfg_options=tiny_seg_options(digits_data)))
    out = str(tmp_path / 'study')
    assert sorted(study_tool.run_study(study, out)) == sorted(r.run_id for r in study.runs())
    results = study_tool.load_results(out)
    assert len(results) == 2
    assert all(0.0 <= r['value'] <= 100.0 for r in results.values())
    table = open(osp.join(out, 'table.md')).read()
    assert '| compact | short | 1 |' in table and '| expandnet | short | 1 |' in table
    assert osp.getsize(osp.join(out, 'figure.png')) > 0
    # Every run's config is the one it trained: 2 iterations, validated at the end.
    run_cfg = Config.fromfile(osp.join(out, 'runs', study.runs()[0].run_id, 'config.py'))
    assert run_cfg.train_cfg.max_iters == 2 and run_cfg.train_cfg.val_interval == 2
    # A second call finds every run finished and trains nothing.
    lines_before = open(osp.join(out, 'results.jsonl')).read()
    assert study_tool.run_study(study, out) == []
    assert open(osp.join(out, 'results.jsonl')).read() == lines_before


def test_a_failed_run_does_not_stop_the_others_and_is_named_at_the_end(study_tool, tmp_path,
                                                                      monkeypatch):
    study = study_tool.load_study(write_study(
        tmp_path / 'study.py', configs=dict(a=str(COMPACT), b=str(EXPANDNET)), seeds=[0, 1],
        metric='mIoU'))
    all_configs = [osp.join(str(tmp_path / 'out'), 'runs', run.run_id, 'config.py')
                   for run in study.runs()]
    configs_written = []

    def fake_execute(study, run, config_path):
        configs_written.append(all(osp.isfile(path) for path in all_configs))
        if run.run_id == 'a_seed0':
            raise study_tool.StudyRunError('run a_seed0 failed (exit 1); see its train.log')
        return dict(run_id=run.run_id, config=run.config_name, levels={}, seed=run.seed,
                    metric='mIoU', value=0.5)

    monkeypatch.setattr(study_tool, 'execute_run', fake_execute)
    out = str(tmp_path / 'out')
    with pytest.raises(study_tool.StudyRunError, match=r'1 run\(s\) failed: a_seed0'):
        study_tool.run_study(study, out, jobs=2)
    assert sorted(study_tool.load_results(out)) == ['a_seed1', 'b_seed0', 'b_seed1']
    assert configs_written == [True] * 4  # every run's config written before the first training


def test_a_run_cut_off_resumes_from_its_last_checkpoint(study_tool, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    assert '--resume' not in study_tool.train_command('cfg.py', str(run_dir))
    (run_dir / 'last_checkpoint').write_text(str(run_dir / 'iter_2.pth'))
    assert study_tool.train_command('cfg.py', str(run_dir))[-1] == '--resume'


def test_dry_run_lists_what_is_done_and_what_is_not(study_tool, tmp_path, capsys):
    study_file = write_study(tmp_path / 'study.py', configs=dict(a=str(COMPACT)), seeds=[0, 1],
                             metric='mIoU')
    out = tmp_path / 'out'
    out.mkdir()
    done = study_tool.load_study(study_file).runs()[0].run_id
    (out / 'results.jsonl').write_text(json.dumps(dict(run_id=done, value=1.0)) + '\n')
    assert study_tool.main([study_file, '--work-dir', str(out), '--dry-run']) == 0
    assert capsys.readouterr().out.splitlines() == ['done  a_seed0', 'to do a_seed1']


STUDY_FILES = sorted((ROOT / 'projects/digits/studies').glob('*.py'))


@pytest.mark.parametrize('path', STUDY_FILES, ids=[p.stem for p in STUDY_FILES])
def test_every_shipped_study_file_builds_the_config_of_each_entry(study_tool, path, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(ROOT)  # study files name configs relative to the repository
    study = study_tool.load_study(str(path))
    firsts = {run.config_name: run for run in reversed(study.runs())}
    for run in firsts.values():
        cfg = study_tool.run_config(study, run, str(tmp_path / run.run_id))
        assert cfg.randomness.seed == run.seed and cfg.model.type


def test_the_width_levels_narrow_every_layer_of_both_detectors(study_tool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = study_tool.load_study('projects/digits/studies/width_schedule.py')
    quarter = {run.config_name: run for run in study.runs()
               if dict(run.levels) == {'width': '0.25x', 'schedule': '4x'} and run.seed == 0}
    compact = study_tool.run_config(study, quarter['compact'], str(tmp_path / 'c')).model
    expandnet = study_tool.run_config(study, quarter['r4'], str(tmp_path / 'e')).model.model
    for model in (compact, expandnet):
        assert tuple(model.backbone.widths) == (4, 8, 16, 16, 32, 32)
        assert model.neck.in_channels == [32, 32, 16] and model.neck.out_channels == [16, 8, 8]
        assert model.bbox_head.in_channels == [16, 8, 8]
        assert model.bbox_head.out_channels == [32, 16, 16]


def test_the_width_levels_narrow_every_conv_of_both_unets(study_tool, tmp_path, monkeypatch):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    monkeypatch.chdir(ROOT)
    study = study_tool.load_study('projects/digits/studies/width_schedule_seg.py')
    runs = {(run.config_name, dict(run.levels)['width']): run for run in study.runs()
            if dict(run.levels)['schedule'] == '1x' and run.seed == 0}

    def model_cfg(name, width):
        cfg = study_tool.run_config(study, runs[(name, width)], str(tmp_path / name / width))
        return cfg.model if name == 'compact' else cfg.model.model

    assert model_cfg('r4', '0.25x') == model_cfg('compact', '0.25x')
    with DefaultScope.overwrite_default_scope('mmseg'):
        full, quarter = (MODELS.build(model_cfg('compact', w)) for w in ('1x', '0.25x'))
    full_convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    quarter_convs = [m for m in quarter.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(full_convs) == len(quarter_convs) > 20
    for wide, narrow in zip(full_convs, quarter_convs):
        classifier = wide.out_channels == 11
        assert narrow.out_channels == (11 if classifier else wide.out_channels // 4)
