"""End-to-end test of ``projects/digits/tools/demo.py --quick``: train, contract, evaluate, report.

One run of the real demo (both tasks, tiny data, a few iterations) in a
subprocess -- the demo builds several MMEngine runners and both the mmdet and
the mmseg scopes, global state that must not leak into the other tests -- and
checks what it leaves behind: the report with numbers for both models of both
tasks, the figures, and deployed models of identical size.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOOL = 'projects/digits/tools/demo.py'
TASKS = ('det', 'seg')
VARIANTS = ('compact', 'expandnet')


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Path:
    """Runs ``projects/digits/tools/demo.py --quick`` once; returns its work dir."""
    tmp = tmp_path_factory.mktemp('demo')
    work_dir = tmp / 'work'
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.run(
        [sys.executable, str(ROOT / DEMO_TOOL), '--quick', '--work-dir',
         str(work_dir), '--data-root', str(tmp / 'data'), '--seed', '1'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-4000:] + '\n' + proc.stderr[-8000:])
    (work_dir / 'stdout.txt').write_text(proc.stdout)
    return work_dir


@pytest.mark.slow
def test_report_files(demo: Path):
    """report.md, report.json, report.png and the prediction images exist."""
    for name in ('report.md', 'report.json', 'report.png', 'det_predictions.png',
                 'seg_predictions.png', 'demo.log'):
        path = demo / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (demo / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_report_numbers(demo: Path):
    """The markdown table holds mAP / mIoU and params for both models of both tasks."""
    text = (demo / 'report.md').read_text()
    assert 'quick' in text.lower() and 'meaningless' in text.lower()
    rows = [line for line in text.splitlines() if line.startswith('| det ')
            or line.startswith('| seg ')]
    assert len(rows) == 4, text
    for row in rows:
        cells = [c.strip() for c in row.strip('|').split('|')]
        task, _, score, params, macs, train_params = cells[:6]
        metric = 'mAP' if task == 'det' else 'mIoU'
        assert re.fullmatch(rf'{metric} -?\d+\.\d\d', score), row
        assert re.fullmatch(r'[\d,]+', params) and int(params.replace(',', '')) > 0, row
        assert re.fullmatch(r'[\d,]+', train_params), row
        assert re.match(r'\d+\.\d M @\d+x\d+', macs), row
    assert 'One seed is one sample' not in text  # quick says its numbers mean nothing


@pytest.mark.slow
def test_deployed_models_identical(demo: Path):
    """Compact and contracted ExpandNet: same params and MACs; training form larger."""
    summary = json.loads((demo / 'report.json').read_text())
    assert summary['quick'] is True
    assert set(summary['tasks']) == set(TASKS)
    for task in TASKS:
        runs = summary['tasks'][task]['runs']
        compact, expandnet = runs['compact'], runs['expandnet']
        assert compact['deployed_params'] == expandnet['deployed_params'] > 0
        assert compact['deployed_macs'] == expandnet['deployed_macs'] > 0
        assert expandnet['training_params'] > 4 * compact['training_params']
        assert compact['training_params'] == compact['deployed_params']
        assert expandnet['deployed_checkpoint'].endswith('_compact.pth')
        assert Path(expandnet['deployed_checkpoint']).is_file()
        for run in (compact, expandnet):
            assert 0.0 <= run['metric'] <= 100.0
            assert run['time_per_iter'] > 0 and run['infer_time'] > 0


@pytest.mark.slow
def test_summary_printed(demo: Path):
    """The one-screen summary ends the output and names both deployed models."""
    out = (demo / 'stdout.txt').read_text()
    tail = out[out.rindex('expand_mm demo --'):]
    assert 'NUMBERS ARE MEANINGLESS' in tail
    assert tail.count('ExpandNet-CL r=4') >= 2 and tail.count('compact') >= 2


def test_jobs_side_by_side_on_cpu_one_after_the_other_on_cuda(monkeypatch):
    """--jobs auto: two processes on a multi-core CPU machine, one on CUDA or one core."""
    from projects.digits.demo import machine
    monkeypatch.setattr(machine.torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(machine, 'usable_cpus', lambda: 2)
    assert machine.resolve_jobs('auto', 2) == 2
    assert machine.resolve_jobs('auto', 1) == 1
    monkeypatch.setattr(machine, 'usable_cpus', lambda: 1)
    assert machine.resolve_jobs('auto', 2) == 1
    monkeypatch.setattr(machine, 'usable_cpus', lambda: 8)
    monkeypatch.setattr(machine.torch.cuda, 'is_available', lambda: True)
    assert machine.resolve_jobs('auto', 2) == 1
    assert machine.resolve_jobs('1', 2) == 1
    assert machine.resolve_jobs('5', 2) == 2
    with pytest.raises(SystemExit, match="--jobs must be 'auto' or a positive integer"):
        machine.resolve_jobs('two', 2)


@pytest.mark.slow
def test_the_old_demo_path_says_where_the_demo_moved_and_runs_it():
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'demo.py'), '--help'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == f'tools/demo.py is deprecated: run {DEMO_TOOL}'
    assert '--quick' in proc.stdout and '--data-root' in proc.stdout
