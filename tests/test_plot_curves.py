"""tools/analysis/plot_curves.py on synthetic MMEngine work dirs with known scalars."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expand_mm.analysis.curves import aggregate, group_runs, load_run
from expand_mm.errors import ConfigError, MissingFileError
from wrapper_test_utils import ROOT


def plot_curves_tool():
    spec = importlib.util.spec_from_file_location(
        'plot_curves_tool', ROOT / 'tools/analysis/plot_curves.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def work_dir(root: Path, name: str, config: str, loss: list[float], l2: float) -> str:
    """A work dir as MMEngine leaves it: the dumped config and <timestamp>/vis_data/scalars.json.

    ``loss`` at steps 10, 20, ...; ``loss_l2`` (written by its own hook, on lines of its
    own) equal to ``l2`` at the same steps; a validation metric at the last step.
    """
    folder = root / name
    (folder / '20260101_000000' / 'vis_data').mkdir(parents=True)
    (folder / f'{config}.py').write_text('# dumped config\n')
    lines = []
    for i, value in enumerate(loss):
        lines.append(dict(lr=0.01, loss=value, step=10 * (i + 1)))
        lines.append(dict(loss_l2=l2, step=10 * (i + 1)))
    lines.append({'coco/bbox_mAP': 0.5, 'step': 10 * len(loss)})
    (folder / '20260101_000000' / 'vis_data' / 'scalars.json').write_text(
        '\n'.join(json.dumps(line) for line in lines) + '\n')
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    return [work_dir(tmp_path, 'a_seed0', 'compact', [4.0, 2.0, 1.0], 0.5),
            work_dir(tmp_path, 'a_seed1', 'compact', [6.0, 4.0, 3.0], 0.5),
            work_dir(tmp_path, 'b_seed0', 'expandnet', [8.0, 1.0, 0.1], 1.0)]


def test_seeds_of_one_config_are_grouped_into_mean_and_spread(runs):
    groups = group_runs([load_run(r) for r in runs])
    assert {k: len(v) for k, v in groups.items()} == {'compact': 2, 'expandnet': 1}
    steps, mean, low, high = aggregate(groups['compact'], 'loss')
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(mean, [5.0, 3.0, 2.0])
    np.testing.assert_allclose(high - mean, [1.0, 1.0, 1.0])  # std over the two seeds
    _, _, low, high = aggregate(groups['compact'], 'loss', spread='range')
    np.testing.assert_allclose(low, [4.0, 2.0, 1.0])
    np.testing.assert_allclose(high, [6.0, 4.0, 3.0])


def test_a_sum_key_adds_scalars_written_on_separate_lines(runs):
    run = load_run(runs[2])
    steps, values = run.series('loss+loss_l2')
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(values, [9.0, 2.0, 1.1])
    assert run.series('coco/bbox_mAP')[0].tolist() == [30]


def test_group_regex_names_groups_by_its_first_group(runs):
    groups = group_runs([load_run(r) for r in runs], pattern=r'/(\w)_seed\d+$')
    assert list(groups) == ['a', 'b']


def test_the_tool_draws_every_key_with_log_scale(runs, tmp_path, capsys):
    tool = plot_curves_tool()
    out = tmp_path / 'curves.png'
    args = tool.parse_args([*runs, '--keys', 'loss', 'loss+loss_l2', '--log', '--out', str(out)])
    groups = group_runs([load_run(r) for r in args.work_dirs])
    fig = tool.plot_curve(groups, args)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ['loss', 'loss+loss_l2']
    assert all(ax.get_yscale() == 'log' for ax in axes)
    mean_line = [line for line in axes[0].get_lines() if line.get_label().startswith('compact')]
    np.testing.assert_allclose(mean_line[0].get_ydata(), [5.0, 3.0, 2.0])
    tool.main([*runs, '--keys', 'loss', '--out', str(out)])
    assert out.stat().st_size > 0
    assert '2 [1, 3] over 2 run(s)' in capsys.readouterr().out  # the last point, mean [band]


@pytest.mark.slow
def test_a_work_dir_without_scalars_is_refused_with_its_name(runs, tmp_path):
    empty = tmp_path / 'never_logged'
    (empty / '20260101_000000' / 'vis_data').mkdir(parents=True)
    with pytest.raises(MissingFileError, match='never_logged: no scalars'):
        load_run(str(empty))
    result = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/plot_curves.py'),
                             runs[0], str(empty), '--out', str(tmp_path / 'x.png')],
                            capture_output=True, text=True, cwd=ROOT,
                            env={'PYTHONPATH': f'{ROOT}:{ROOT / "tests"}', 'PATH': ''})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f'error: {empty}: no scalars')
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_key_names_the_run_and_the_keys_it_has(runs):
    with pytest.raises(ConfigError, match="a_seed0: no scalar 'mIoU'.*loss_l2"):
        load_run(runs[0]).series('mIoU')


def test_a_key_only_some_groups_logged_leaves_the_others_out_of_its_panel(runs, tmp_path, capsys):
    tool = plot_curves_tool()
    extra = work_dir(tmp_path, 'c_seed0', 'hooked', [1.0, 1.0, 1.0], 0.0)
    path = Path(extra) / '20260101_000000' / 'vis_data' / 'scalars.json'
    path.write_text(path.read_text() + json.dumps({'gc/compact/min_cos': -0.1, 'step': 30}))
    args = tool.parse_args([*runs, extra, '--keys', 'gc/compact/min_cos'])
    fig = tool.plot_curve(group_runs([load_run(r) for r in args.work_dirs]), args)
    assert [line.get_label() for line in fig.axes[0].get_lines()
            if not line.get_label().startswith('_')] == ['hooked (n=1)']
    assert 'compact' in capsys.readouterr().out.split('not logged by this group')[0]
    args = tool.parse_args([*runs, '--keys', 'gc/compact/min_cos'])
    with pytest.raises(ConfigError, match="no scalar 'gc/compact/min_cos'"):
        tool.plot_curve(group_runs([load_run(r) for r in args.work_dirs]), args)
