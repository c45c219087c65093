"""Gradient confusion of the model being trained, measured during training."""
from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Iterator

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.data import DataLoader

from ..analysis.gradient_confusion import (GradientConfusionResult, gradient_confusion,
                                           mm_loss_fn, mm_preprocess)
from ..errors import ConfigError
from ..models.deployable import deployable_model
from ..surgery import expanded_layers

# The statistics of GradientConfusionResult.summary() written as scalars.
LOGGED_STATISTICS = ('min_cos', 'mean_cos', 'frac_negative', 'eta')
SCALAR_PREFIX = 'gc'


@contextlib.contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Within the block the python, numpy and torch (CPU and CUDA) RNGs may be used freely.

    Their states are saved on entry and put back on exit, so whatever draws
    inside the block (random data transforms, dropout) leaves the training's
    random stream exactly where it was.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def preserved_grads(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``.grad`` (``None`` or a tensor) is as it was after the block."""
    saved = [(p, None if p.grad is None else p.grad.detach().clone())
             for p in model.parameters()]
    try:
        yield
    finally:
        for param, grad in saved:
            if grad is None:
                param.grad = None
            elif param.grad is None:
                param.grad = grad
            else:
                param.grad.copy_(grad)


@HOOKS.register_module()
class GradientConfusionHook(Hook):
    """Log the gradient confusion of the trained model every ``interval`` iterations or epochs.

    The quantity the ExpandNets paper draws over training (its Fig. 2): the
    cosine similarities of the gradients of several mini-batches taken at the
    current parameters, without an update
    (:func:`~expand_mm.analysis.gradient_confusion`). The mini-batches are
    fixed once, at ``before_train``: ``num_batches`` batches of the training
    set's size drawn with ``seed`` from the train dataset (its training
    transforms) and preprocessed, so that every point of the curve compares
    the same data and only the parameters change.

    The model measured is the deployable network
    (:func:`~expand_mm.models.deployable_model`, on its task loss) in the
    training space (the trained parameters: an ExpandNet's factors) and, when
    it has expanded layers, also in the compact space (the effective compact
    weights, the space a compact baseline lives in). For each space it writes
    ``gc/<space>/min_cos``, ``mean_cos``, ``frac_negative`` and ``eta`` through
    ``runner.visualizer.add_scalars`` (every visualisation backend: the local
    ``vis_data/scalars.json``, TensorBoard, ...) at step ``runner.iter``, plus
    its own cost: ``gc/seconds`` (this measurement) and ``gc/cost_fraction``
    (all measurements so far over the wall time since ``before_train``).

    The training is exactly as without the hook: no parameter is updated,
    ``.grad`` is untouched (and restored), batch-norm statistics and the
    train/eval flags are put back, and the python, numpy and torch RNG
    states are restored, so the next iteration draws the same random numbers.

    Acts at ``before_train`` (fixes the batches; with ``measure_at_start``
    measures the starting point) and ``after_train_iter`` /
    ``after_train_epoch`` (every ``interval``; the one matching ``by_epoch``).

    Args:
        interval: Measure every ``interval`` iterations (or epochs with
            ``by_epoch=True``).
        by_epoch: Count epochs instead of iterations.
        num_batches: Mini-batches compared (pairs = N (N - 1) / 2); the cost
            of one measurement grows with N (one forward and backward pass per
            batch and space).
        seed: Seed of the choice of the fixed mini-batches.
        measure_at_start: Also measure at ``before_train`` (step 0, or the
            resumed iteration).
        bn: ``'train'`` (batch statistics, as a training step) or ``'eval'``.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 200, by_epoch: bool = False, num_batches: int = 8,
                 seed: int = 0, measure_at_start: bool = True, bn: str = 'train'):
        for name, value, low in (('interval', interval, 1), ('num_batches', num_batches, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f'GradientConfusionHook: {name}={value!r} must be an int '
                                  f'>= {low}')
        if bn not in ('train', 'eval'):
            raise ConfigError(f"GradientConfusionHook: bn={bn!r} must be 'train' or 'eval'")
        self.interval = interval
        self.by_epoch = by_epoch
        self.num_batches = num_batches
        self.seed = seed
        self.measure_at_start = measure_at_start
        self.bn = bn
        self.batches: list[Any] = []
        self.results: dict[str, GradientConfusionResult] = {}
        self._seconds = 0.0
        self._start = 0.0

    # ------------------------------------------------------------------ stages

    def before_train(self, runner) -> None:
        """Fix the mini-batches; measure the starting point if asked."""
        self._start = time.perf_counter()
        self._seconds = 0.0
        with preserved_rng_states():
            self.batches = self.fixed_batches(runner)
        if self.measure_at_start:
            self.measure(runner, step=runner.epoch if self.by_epoch else runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """Measure every ``interval`` iterations (``by_epoch=False``)."""
        if not self.by_epoch and self.every_n_train_iters(runner, self.interval):
            self.measure(runner, step=runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        """Measure every ``interval`` epochs (``by_epoch=True``)."""
        if self.by_epoch and self.every_n_epochs(runner, self.interval):
            self.measure(runner, step=runner.epoch + 1)

    # ------------------------------------------------------------------ work

    def fixed_batches(self, runner) -> list[Any]:
        """``num_batches`` preprocessed training batches drawn with ``seed``.

        A loader of its own over the train dataset (no worker, the train
        loader's collate function and batch size), so the training loader's
        iterator and sampler are not touched.
        """
        loader = runner.train_dataloader
        dataset = loader.dataset
        batch_size = loader.batch_size or getattr(loader.batch_sampler, 'batch_size', None)
        wanted = self.num_batches * batch_size
        if wanted > len(dataset):
            raise ConfigError(f'GradientConfusionHook: num_batches={self.num_batches} '
                              f'batches of {batch_size} need {wanted} samples; the train '
                              f'dataset has {len(dataset)}')
        indices = np.random.default_rng(self.seed).choice(len(dataset), wanted, replace=False)
        own = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(),
                         collate_fn=loader.collate_fn, num_workers=0)
        return mm_preprocess(deployable_model(runner.model), own, training=True)

    def spaces(self, model: nn.Module) -> tuple[str, ...]:
        """``('training', 'compact')`` for a model with expanded layers, else ``('training',)``."""
        return ('training', 'compact') if expanded_layers(model) else ('training',)

    def measure(self, runner, step: int) -> dict[str, float]:
        """Measure every space at the current parameters and write the scalars at ``step``."""
        began = time.perf_counter()
        model = deployable_model(runner.model)
        loss_fn = mm_loss_fn(preprocess=False)
        with preserved_rng_states(), preserved_grads(model):
            self.results = {space: gradient_confusion(model, self.batches, loss_fn,
                                                      space=space, bn=self.bn)
                            for space in self.spaces(model)}
        scalars = {}
        for space, result in self.results.items():
            summary = result.summary()
            scalars.update({f'{SCALAR_PREFIX}/{space}/{k}': summary[k]
                            for k in LOGGED_STATISTICS})
        seconds = time.perf_counter() - began
        self._seconds += seconds
        elapsed = time.perf_counter() - self._start
        scalars[f'{SCALAR_PREFIX}/seconds'] = seconds
        scalars[f'{SCALAR_PREFIX}/cost_fraction'] = self._seconds / max(elapsed, 1e-9)
        runner.visualizer.add_scalars(scalars, step=step)
        runner.logger.info('gradient confusion at %s %d: %s', 'epoch' if self.by_epoch
                           else 'iter', step, ', '.join(f'{k.split("/", 1)[1]} {v:.4g}'
                                                        for k, v in scalars.items()))
        return scalars
