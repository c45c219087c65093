"""Loss landscape along filter-normalised random directions (Li et al., NeurIPS 2018).

The ExpandNets paper plots the loss of a compact model and of its ExpandNet
around the trained parameters ``θ`` along random directions: the 1-D curve
``L(θ + α d)`` and the 2-D surface ``L(θ + α d1 + β d2)``. A random direction
only means something relative to the scale of the weights it moves, so each
one is *filter-normalised* (:func:`filter_normalized_direction`): a Gaussian
tensor per parameter, each output filter (slice along dim 0: an output
channel of a conv, a row of a linear weight) rescaled to the norm of the same
filter of the weights. One-dimensional parameters -- biases and the affine
parameters of normalisation layers -- get a zero direction (Li et al.'s
``ignore='biasbn'``): they stay at their values.

For an ExpandNet the perturbed parameters are, by default, the training form
(the factors of every chain, each normalised per its own output filters):
the landscape the optimizer walks on. ``form='compact'`` perturbs the
contracted model instead (a deep copy; every composed kernel normalised per
its own filters), the space of the deployed model and of a compact baseline.

The loss is the mean of ``loss_fn(model, batch)`` over a fixed list of
batches, with the model in eval mode: batch norm uses its running statistics,
so a point's loss depends on the parameters alone and not on how the batch
statistics move with them (and no running statistic changes). The
parameters are put back bit for bit afterwards, which is checked.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..surgery import contract_model, expanded_layers
from .gradient_confusion import LossFn, _check_loss, _finite_or_none, _take, analysis_mode

FORMS = ('training', 'compact')


def landscape_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable floating-point parameter: what is perturbed."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point()]


def filter_normalized_direction(params: Sequence[Tensor],
                                generator: torch.Generator) -> list[Tensor]:
    """A random direction with the per-filter norms of ``params``.

    For each parameter of two or more dimensions a standard Gaussian tensor is
    drawn (float32 on the CPU from ``generator``, so a seed gives the same
    direction on any device) and every slice along dim 0 is scaled to the
    norm of the same slice of the parameter; a zero filter gets a zero
    direction. Parameters of zero or one dimension (biases, norm affine
    parameters) get zeros.

    Args:
        params: The parameters, in a fixed order.
        generator: Source of the Gaussian draws.

    Returns:
        One tensor per parameter, with its shape, dtype and device.
    """
    directions = []
    for param in params:
        if param.dim() <= 1:
            directions.append(torch.zeros_like(param))
            continue
        d = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        d = d.to(device=param.device, dtype=torch.float64)
        w = param.detach().to(torch.float64)
        d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(1e-300),
                            torch.zeros_like(d_norm))
        d = d * scale.reshape(-1, *([1] * (d.dim() - 1)))
        directions.append(d.to(param.dtype))
    return directions


@dataclass
class LandscapeResult:
    """Loss values on a line or a plane through the parameters.

    Attributes:
        x: Coordinates along the first direction.
        y: Coordinates along the second direction (``None`` for a 1-D curve).
        losses: ``len(x)`` values (1-D) or a ``len(y) x len(x)`` grid (2-D,
            row ``j`` is ``y[j]``).
        base_loss: The loss at the unperturbed parameters.
        form: ``'training'`` or ``'compact'``.
        num_params: Number of perturbed entries (all trainable parameters,
            1-D ones with a zero direction included).
        num_batches: Batches the loss is averaged over.
        seed: Seed of the directions.
        meta: Free-form context kept in :meth:`to_dict`.
        metrics: With a ``metric_fn``: its values, shaped as ``losses``.
        base_metric: With a ``metric_fn``: its value at the unperturbed parameters.
    """

    x: list[float]
    y: list[float] | None
    losses: list[Any]
    base_loss: float
    form: str = 'training'
    num_params: int = 0
    num_batches: int = 0
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] | None = None
    base_metric: float | None = None

    def _at_center(self, values: list[Any] | None) -> float | None:
        if values is None or 0.0 not in self.x or (self.y is not None and 0.0 not in self.y):
            return None
        i = self.x.index(0.0)
        return values[i] if self.y is None else values[self.y.index(0.0)][i]

    @property
    def center_loss(self) -> float | None:
        """The loss at coordinate 0 (0, 0) if the grid holds it, else ``None``."""
        return self._at_center(self.losses)

    @property
    def center_metric(self) -> float | None:
        """The metric at coordinate 0 (0, 0) if there is one and the grid holds it."""
        return self._at_center(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (non-finite losses become ``None``)."""
        return _finite_or_none(dict(
            x=self.x, y=self.y, losses=self.losses, base_loss=self.base_loss,
            center_loss=self.center_loss, form=self.form, num_params=self.num_params,
            num_batches=self.num_batches, seed=self.seed, meta=self.meta,
            metrics=self.metrics, base_metric=self.base_metric,
            center_metric=self.center_metric))


def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn) -> float:
    """Mean of ``loss_fn(model, b)`` over ``batches`` (no gradients)."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            total += float(_check_loss(loss_fn(model, batch), 'loss landscape'))
    return total / len(batches)


def _coordinates(steps: int, span: float | tuple[float, float], what: str) -> list[float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f'{what}: steps={steps!r} must be an int >= 2')
    low, high = (-span, span) if isinstance(span, (int, float)) else span
    if not low < high:
        raise ConfigError(f'{what}: span={span!r} must be a positive number or (low, high)')
    coords = np.linspace(float(low), float(high), steps)
    # Exactly 0 where the grid passes through it, so the centre is the
    # unperturbed model bit for bit.
    coords[np.isclose(coords, 0.0, atol=1e-12 * (high - low))] = 0.0
    return [float(c) for c in coords]


def _landscape(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, *,
               num_dirs: int, steps: int, span: float | tuple[float, float],
               seed: int, form: str, num_batches: int | None,
               progress: Callable[[int, int], None] | None, what: str,
               metric_fn: Callable[[nn.Module], float] | None = None) -> LandscapeResult:
    if form not in FORMS:
        raise ConfigError(f'{what}: form={form!r} must be one of {FORMS}')
    coords = _coordinates(steps, span, what)
    batches = list(_take(batches, num_batches, what))
    if not batches:
        raise ConfigError(f'{what}: no batch to evaluate the loss on')
    if form == 'compact' and expanded_layers(model):
        # A deep copy: the caller's model keeps its factors.
        model = contract_model(model)
    named = landscape_parameters(model)
    if not named:
        raise ConfigError(f'{what}: {type(model).__name__} has no trainable floating-point '
                          'parameter to perturb')
    params = [p for _, p in named]
    generator = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(params, generator) for _ in range(num_dirs)]
    origin = [p.detach().clone() for p in params]
    grid = list(itertools.product(coords, repeat=num_dirs))
    values: list[float] = []
    scores: list[float] = []
    with analysis_mode(model, training=False):
        base = mean_loss(model, batches, loss_fn)
        base_metric = metric_fn(model) if metric_fn is not None else None
        try:
            for index, point in enumerate(grid):
                with torch.no_grad():
                    for i, (p, p0) in enumerate(zip(params, origin)):
                        p.copy_(p0)
                        for alpha, direction in zip(point, directions):
                            if alpha != 0.0:
                                p.add_(direction[i], alpha=alpha)
                values.append(mean_loss(model, batches, loss_fn))
                if metric_fn is not None:
                    scores.append(metric_fn(model))
                if progress is not None:
                    progress(index + 1, len(grid))
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, origin):
                    p.copy_(p0)
    changed = [n for (n, p), p0 in zip(named, origin) if not torch.equal(p.detach(), p0)]
    if changed:
        raise RuntimeError(f'{what}: parameters not restored exactly: {changed[:5]}')
    def shaped(flat: list[float]) -> list[Any]:
        # itertools.product varies the last coordinate fastest: point = (x, y)
        # with y fastest, so transpose to rows of constant y.
        return flat if num_dirs == 1 else \
            np.asarray(flat).reshape(len(coords), len(coords)).T.tolist()

    return LandscapeResult(x=coords, y=None if num_dirs == 1 else coords,
                           losses=shaped(values), base_loss=base, form=form,
                           num_params=sum(p.numel() for p in params),
                           num_batches=len(batches), seed=seed,
                           metrics=shaped(scores) if metric_fn is not None else None,
                           base_metric=base_metric)


def loss_landscape_1d(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, *,
                      steps: int = 21, span: float | tuple[float, float] = 1.0,
                      seed: int = 0, form: str = 'training', num_batches: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      metric_fn: Callable[[nn.Module], float] | None = None
                      ) -> LandscapeResult:
    """``L(θ + α d)`` for ``steps`` values of α along one filter-normalised direction.

    Args:
        model: Any module (its trainable floating-point parameters are moved).
        batches: The batches the loss is averaged over (materialised once;
            give preprocessed mm batches, see
            :func:`~expand_mm.analysis.gradient_confusion.mm_preprocess`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        steps: Number of α values, evenly spaced (an odd number holds α = 0).
        span: α runs over ``[-span, span]``, or ``(low, high)``.
        seed: Seed of the direction: the same seed gives the same direction.
        form: ``'training'`` (the parameters as they are; the factors of an
            ExpandNet) or ``'compact'`` (a contracted copy of the model).
        num_batches: Take the first ``num_batches`` batches (``None``: all).
        progress: Called as ``progress(done, total)`` after each point.
        metric_fn: Also evaluate ``metric_fn(model)`` (in eval mode) at the
            unperturbed parameters and every point, e.g. the config's own
            mAP / mIoU on a subset (:class:`~expand_mm.analysis.metric.SubsetMetric`).

    Returns:
        A :class:`LandscapeResult` with ``y=None``.

    Raises:
        ValueError: For bad ``steps`` / ``span`` / ``form``, or no batch.
        RuntimeError: If a parameter is not restored bit for bit.
    """
    return _landscape(model, batches, loss_fn, num_dirs=1, steps=steps, span=span, seed=seed,
                      form=form, num_batches=num_batches, progress=progress,
                      what='loss_landscape_1d', metric_fn=metric_fn)


def loss_landscape_2d(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, *,
                      steps: int = 11, span: float | tuple[float, float] = 1.0,
                      seed: int = 0, form: str = 'training', num_batches: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      metric_fn: Callable[[nn.Module], float] | None = None
                      ) -> LandscapeResult:
    """``L(θ + α d1 + β d2)`` on a ``steps x steps`` grid of two filter-normalised directions.

    The directions are drawn one after the other from the same seeded
    generator, so ``d1`` is the direction :func:`loss_landscape_1d` uses with
    the same seed. Arguments as in :func:`loss_landscape_1d`; the cost is
    ``steps**2`` loss evaluations over the batches.

    Returns:
        A :class:`LandscapeResult`; ``losses[j][i]`` is the loss at
        ``(x[i], y[j])``.
    """
    return _landscape(model, batches, loss_fn, num_dirs=2, steps=steps, span=span, seed=seed,
                      form=form, num_batches=num_batches, progress=progress,
                      what='loss_landscape_2d', metric_fn=metric_fn)
