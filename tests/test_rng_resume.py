"""A run with random augmentation, killed and resumed, ends with the uninterrupted run's weights.

The digits detector gets random crops and flips in its pipeline and a
``BatchSyncRandomResize`` in its data preprocessor (drawn in the training
step, which skipping the trained batches on resume does not replay). The
training process is SIGKILLed after iteration 3 (its checkpoint of iteration
2 complete) and resumed with ``--resume``; iteration 4 must end bit-identical.
With ``randomness.seed`` unset, the uninterrupted run's checkpoint of
iteration 2 is resumed in a new process (which draws a seed of its own).
"""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from expand_mm.hooks.rng_state import RNG_STATE_KEY, capture_rng_state, restore_rng_state

from test_kill_safe import differing, digits_cfg, dump, save_events, trainer, weights  # noqa: F401

RANDOM_AUGMENTATION = [dict(type='RandomCrop', crop_size=(48, 48), allow_negative_crop=True),
                       dict(type='RandomFlip', prob=0.5)]
RANDOM_RESIZE = dict(type='BatchSyncRandomResize', random_size_range=(32, 96), size_divisor=32,
                     interval=1)


def augmented_cfg(tmp_path, seed):
    """4 iterations saving at 2 and 4, with random crops, flips and batch sizes."""
    cfg = digits_cfg(tmp_path, max_iters=4, interval=2)
    pipeline = cfg.train_dataloader.dataset.pipeline
    pipeline[-1:-1] = RANDOM_AUGMENTATION  # before PackDetInputs
    cfg.model.model.data_preprocessor.batch_augments = [RANDOM_RESIZE]  # ExpandNet's model
    cfg.randomness = dict(seed=seed)
    return cfg


def resumed_in_a_new_process(trainer, config, reference_dir, work_dir, seed):
    """Resume at iteration 2 in a new process: the run killed after iteration 3 when the
    seed is set; with it unset, a copy of the uninterrupted run's iteration-2 checkpoint
    (a killed run would have drawn its own seed, so no uninterrupted run would match it)."""
    if seed is None:
        work_dir.mkdir()
        for name in ('iter_2.pth', 'iter_2_compact.pth'):
            shutil.copy(reference_dir / name, work_dir / name)
        (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
    else:
        killed = trainer.run(config, '--work-dir', str(work_dir),
                             kill_at=str(save_events(reference_dir.parent / 'events.log', 4)[0]))
        assert killed.returncode == -9, killed.output[-3000:]
        assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth',
                                                                  'iter_2_compact.pth']
    stored = torch.load(work_dir / 'iter_2.pth', weights_only=True)[RNG_STATE_KEY]
    assert set(stored) >= {'python', 'numpy', 'torch', 'batch_sizes'}
    return trainer.run(config, '--work-dir', str(work_dir), '--resume')


@pytest.mark.slow  # three training processes
@pytest.mark.parametrize('seed', [0, None], ids=['seed-0', 'seed-unset'])
def test_a_killed_run_with_random_augmentation_resumes_bit_identical(tmp_path, trainer, seed):
    config = dump(augmented_cfg(tmp_path, seed), tmp_path / 'cfg.py')
    reference_dir = tmp_path / 'reference'
    done = trainer.run(config, '--work-dir', str(reference_dir), event_log=tmp_path / 'events.log')
    assert done.returncode == 0, done.output[-3000:]
    work_dir = tmp_path / 'resumed'
    resumed = resumed_in_a_new_process(trainer, config, reference_dir, work_dir, seed)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert 'Advance dataloader 2 steps' in resumed.output  # it did resume at iteration 2
    if seed is None:  # the dataloader was built with a new seed, then with the resumed one
        assert 'rebuilding the train dataloader with the resumed seed' in resumed.output
    assert not differing(weights(reference_dir / 'iter_4.pth'), weights(work_dir / 'iter_4.pth'))


def test_the_generator_states_survive_a_weights_only_checkpoint(tmp_path):
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    torch.save({RNG_STATE_KEY: state}, tmp_path / 'ckpt.pth')
    loaded = torch.load(tmp_path / 'ckpt.pth', weights_only=True)[RNG_STATE_KEY]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng_state(loaded)
    drawn = (random.random(), float(np.random.rand()), torch.rand(3))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])
