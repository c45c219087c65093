"""Gradient confusion: how much the gradients of different mini-batches disagree.

Sankararaman et al. (2019) call a model's training problem *η-confused* when
``<g_i, g_j> >= -η`` for the gradients ``g_i`` of any two mini-batches; the
smaller η (and the fewer strongly negative pairs), the faster SGD converges.
The ExpandNets paper (Guo, Alvarez, Salzmann, NeurIPS 2020) uses it to show
that the expanded training form of a compact network is less confused.

:func:`gradient_confusion` takes any ``nn.Module``, an iterable of batches and
a loss function ``loss_fn(model, batch) -> scalar``, computes one gradient per
batch and returns their Gram matrix (:class:`GradientConfusionResult`): number
of pairs, mean / median cosine similarity, the fraction of negative pairs, the
minimum cosine, η and a density of the cosines.

Two parameter spaces:

- ``'training'``: the gradient w.r.t. the parameters the optimizer updates (for
  an ExpandNet, the factors of every chain);
- ``'compact'``: the gradient w.r.t. the effective compact weights: every
  expanded layer is swapped for its contraction (same function) while the
  gradient is taken, so each expanded layer contributes the gradient w.r.t. its
  composed weight and bias, every other parameter its own. A compact model and
  its ExpandNet then live in the same space, parameter for parameter.

The mm adapters at the end (:func:`mm_loss_fn`, :func:`mm_preprocess`,
:func:`build_mm_model_and_loader`) turn an MMEngine ``BaseModel`` and its
config into the model, batches and loss function these functions take; the
loss landscape (:mod:`expand_mm.analysis.loss_landscape`) uses them too.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, ConfigTypeError, SetupError
from ..layers import deferred_factor_grads
from ..surgery import expanded_layers, replace_submodule

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: the training loss of one batch."""

SPACES = ('training', 'compact')
BN_MODES = ('train', 'eval')
# Entries of the (N x chunk) float64 block of gradient columns multiplied at
# once when forming the Gram matrix: 2**23 entries, 64 MiB whatever N.
_GRAM_BLOCK = 1 << 23


# --------------------------------------------------------------------- helpers

@contextlib.contextmanager
def compact_form(model: nn.Module) -> Iterator[int]:
    """Within the block every expanded layer of ``model`` is replaced by its contraction.

    The stand-ins are the layers' :meth:`~expand_mm.layers.ExpandedLayer.contract`
    (composed in float64, cast to the factors' dtype), in the layers' train/eval
    state, trainable when any factor is. The model computes the same function,
    and its parameters are then the effective compact weights. The expanded
    layers (same objects, untouched) come back on exit; updates to the
    stand-ins are not carried back.

    Yields:
        The number of layers swapped.

    Raises:
        RuntimeError: If a layer cannot contract (a nonlinearity is set between
            its sub-layers); the model is left as it was.
    """
    layers = expanded_layers(model)
    stand_ins = []
    for path, layer in layers:
        stand_in = layer.contract()
        stand_in.requires_grad_(any(p.requires_grad for p in layer.parameters()))
        stand_ins.append(stand_in)
    try:
        for (path, _), stand_in in zip(layers, stand_ins):
            replace_submodule(model, path, stand_in)
        yield len(layers)
    finally:
        for path, layer in layers:
            replace_submodule(model, path, layer)


@contextlib.contextmanager
def analysis_mode(model: nn.Module, training: bool, bn_eval: bool = False,
                  restore_buffers: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in train or eval mode for the block and undo every side effect.

    Args:
        model: Any module.
        training: ``model.train()`` if True, ``model.eval()`` otherwise.
        bn_eval: With ``training``, keep every batch-norm layer in eval mode
            (running statistics instead of the batch's).
        restore_buffers: Put every buffer back on exit: batch norm in training
            mode updates its running statistics on each forward pass, which an
            analysis must not leave behind.

    Yields:
        ``model``.
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = ([(b, b.detach().clone()) for b in model.buffers()]
               if restore_buffers else [])
    try:
        model.train(training)
        if training and bn_eval:
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        yield model
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, flag in flags:
            module.training = flag


def _take(batches: Iterable[Any], num_batches: int | None, what: str) -> Iterator[Any]:
    if num_batches is None:
        return iter(batches)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f'{what}: num_batches={num_batches!r} must be a positive int '
                          '(or None for every batch of a finite iterable)')
    return itertools.islice(batches, num_batches)


def _check_loss(loss: Any, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigTypeError(f'{what}: loss_fn returned {type(loss).__name__} '
                              f'{tuple(getattr(loss, "shape", ()))}; it must return a scalar '
                              'tensor (for an mm model: the loss_fn of mm_loss_fn())')
    return loss.reshape(())


# ------------------------------------------------------------- the gradients

class _VectorStore:
    """Flat float32 gradient vectors on the CPU, in memory or as ``.npy`` files.

    Args:
        store_dir: A directory for the vectors (memory-mapped when the Gram
            matrix is formed); ``None`` keeps them in memory.
    """

    def __init__(self, store_dir: str | None = None):
        self.store_dir = store_dir
        self._items: list[Any] = []
        if store_dir is not None:
            os.makedirs(store_dir, exist_ok=True)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, vector: Tensor) -> None:
        """Keep ``vector`` (1-D float32 on the CPU)."""
        if self.store_dir is None:
            self._items.append(vector)
            return
        path = osp.join(self.store_dir, f'grad_{len(self._items):05d}.npy')
        np.save(path, vector.numpy())
        self._items.append(path)

    def _rows(self) -> list[Any]:
        if self.store_dir is None:
            return [v.numpy() for v in self._items]
        return [np.load(p, mmap_mode='r') for p in self._items]

    def gram(self) -> np.ndarray:
        """``G[i, j] = <g_i, g_j>`` accumulated in float64, a column chunk at a time."""
        rows = self._rows()
        n = len(rows)
        gram = np.zeros((n, n), dtype=np.float64)
        dim = rows[0].shape[0] if rows else 0
        chunk = max(_GRAM_BLOCK // max(n, 1), 1024)
        for start in range(0, dim, chunk):
            block = np.stack([r[start:start + chunk] for r in rows], dtype=np.float64)
            gram += block @ block.T
        return gram

    def clear(self) -> None:
        """Drop the vectors (and their files)."""
        if self.store_dir is not None:
            for path in self._items:
                os.remove(path)
        self._items = []


def gradient_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_gradient(model: nn.Module, batch: Any, loss_fn: LossFn,
                  params: Sequence[Tensor]) -> tuple[float, Tensor]:
    """The loss of one batch and its gradient w.r.t. ``params``, flattened.

    ``torch.autograd.grad`` is used, so no ``.grad`` attribute is touched; a
    parameter the loss does not reach contributes zeros.

    Args:
        model: The module ``loss_fn`` runs.
        batch: One batch, as ``loss_fn`` takes it.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        params: The tensors to differentiate w.r.t.

    Returns:
        ``(loss, gradient)``: the loss as a float and the gradient as one 1-D
        float32 CPU tensor (the parameters' gradients concatenated in order).
    """
    loss = _check_loss(loss_fn(model, batch), 'gradient')
    if not loss.requires_grad:
        raise SetupError('flat_gradient: the loss does not depend on any of the given '
                         'parameters (is autograd disabled, or every parameter frozen?)')
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    # Concatenated where the gradients are, then one copy to the CPU (not one
    # device-to-host transfer per parameter).
    flat = torch.cat([
        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
        for g, p in zip(grads, params)]).cpu()
    return float(loss.detach()), flat


@dataclass
class GradientConfusionResult:
    """Gram matrix of per-batch gradients, and the statistics of its pairs.

    Attributes:
        gram: ``(N, N)`` float64 inner products ``<g_i, g_j>``.
        losses: Loss of each batch.
        space: ``'training'`` or ``'compact'``.
        num_params: Dimension of the gradient vectors.
        bn: ``'train'`` (batch statistics) or ``'eval'`` (running statistics).
        meta: Free-form context (config, checkpoint, ...) kept in :meth:`to_dict`.
    """

    gram: np.ndarray
    losses: list[float]
    space: str = 'training'
    num_params: int = 0
    bn: str = 'train'
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_batches(self) -> int:
        """Number of gradients ``N``."""
        return int(self.gram.shape[0])

    @property
    def norms(self) -> np.ndarray:
        """Euclidean norm of each gradient."""
        return np.sqrt(np.clip(np.diag(self.gram), 0, None))

    def _pairs(self, matrix: np.ndarray) -> np.ndarray:
        return matrix[np.triu_indices(self.num_batches, k=1)]

    @property
    def inner_products(self) -> np.ndarray:
        """``<g_i, g_j>`` of every pair ``i < j`` (row-major order)."""
        return self._pairs(self.gram)

    @property
    def cosines(self) -> np.ndarray:
        """Cosine similarity of every pair ``i < j``; NaN where a gradient is zero."""
        norms = self.norms
        with np.errstate(invalid='ignore', divide='ignore'):
            cos = self.gram / np.outer(norms, norms)
        return np.clip(self._pairs(cos), -1.0, 1.0)

    @property
    def eta(self) -> float:
        """Gradient confusion ``max(0, max_{i<j} -<g_i, g_j>)``."""
        inner = self.inner_products
        return float(max(0.0, -inner.min())) if inner.size else 0.0

    def summary(self) -> dict[str, float]:
        """Number of pairs, cosine statistics, η, and the gradient norms.

        Pairs with a zero gradient (undefined cosine) are left out of the
        cosine statistics and counted in ``undefined_pairs``.
        """
        cos = self.cosines
        defined = cos[np.isfinite(cos)]
        norms = self.norms

        def stat(fn, values):
            return float(fn(values)) if values.size else math.nan

        return dict(
            num_batches=self.num_batches,
            num_pairs=int(cos.size),
            undefined_pairs=int(cos.size - defined.size),
            mean_cos=stat(np.mean, defined),
            median_cos=stat(np.median, defined),
            frac_negative=stat(lambda v: np.mean(v < 0), defined),
            min_cos=stat(np.min, defined),
            max_cos=stat(np.max, defined),
            eta=self.eta,
            mean_grad_norm=float(norms.mean()) if norms.size else math.nan,
            mean_loss=float(np.mean(self.losses)) if self.losses else math.nan,
            num_params=self.num_params)

    def histogram(self, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """Density histogram of the defined cosines over ``[-1, 1]``: ``(density, edges)``."""
        cos = self.cosines
        cos = cos[np.isfinite(cos)]
        return np.histogram(cos, bins=bins, range=(-1.0, 1.0), density=bool(cos.size))

    def density(self, points: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
        """Gaussian kernel density of the cosines at ``points`` (:func:`cosine_density`)."""
        return cosine_density(self.cosines, points, bandwidth)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the summary, the settings, the Gram matrix and the histogram."""
        density, edges = self.histogram()
        return dict(summary=_finite_or_none(self.summary()), space=self.space, bn=self.bn,
                    losses=[float(v) for v in self.losses], gram=self.gram.tolist(),
                    cosines=_finite_or_none(self.cosines.tolist()),
                    histogram=dict(density=density.tolist(), edges=edges.tolist()),
                    meta=self.meta)


def cosine_density(cosines: np.ndarray, points: np.ndarray,
                   bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density of cosine similarities at ``points``.

    The kernels are reflected at -1 and 1 (cosines live in ``[-1, 1]``), so
    the density integrates to 1 over that interval instead of leaking out.
    Cosines of several runs pooled into one array give the density over runs.

    Args:
        cosines: The cosines (non-finite ones, undefined pairs, are left out).
        points: Where to evaluate (e.g. ``np.linspace(-1, 1, 201)``).
        bandwidth: Kernel width; default Scott's rule ``1.06 σ n^(-1/5)``,
            at least 0.01 (a tight cluster of cosines stays visible).

    Returns:
        The density at ``points`` (zeros when no cosine is defined).
    """
    points = np.asarray(points, dtype=np.float64)
    cos = np.asarray(cosines, dtype=np.float64)
    cos = cos[np.isfinite(cos)]
    if not cos.size:
        return np.zeros_like(points)
    if bandwidth is None:
        bandwidth = max(1.06 * float(cos.std()) * cos.size ** -0.2, 0.01)
    centres = np.concatenate([cos, 2.0 - cos, -2.0 - cos])
    z = (points[:, None] - centres[None, :]) / bandwidth
    return np.exp(-0.5 * z ** 2).sum(1) / (cos.size * bandwidth * math.sqrt(2 * math.pi))


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def gradient_confusion(model: nn.Module,
                       batches: Iterable[Any],
                       loss_fn: LossFn,
                       *,
                       num_batches: int | None = None,
                       space: str = 'training',
                       bn: str = 'train',
                       store_dir: str | None = None,
                       progress: Callable[[int, float], None] | None = None
                       ) -> GradientConfusionResult:
    """Gradients of ``loss_fn`` on each batch and the confusion between them.

    For every batch the gradient of its loss is taken at the model's current
    parameters (nothing is updated), flattened to float32 on the CPU and kept
    (in memory, or under ``store_dir``); at the end their Gram matrix is formed
    in float64, a chunk of columns at a time. The model's train/eval flags and
    buffers (batch-norm running statistics) are restored afterwards, and no
    ``.grad`` is touched.

    Args:
        model: Any module; an ExpandNet or a plain compact model.
        batches: Iterable of batches as ``loss_fn`` takes them. The same
            batches (same order) must be given to models that are compared.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (for an mm model:
            :func:`mm_loss_fn`).
        num_batches: Use the first ``num_batches`` batches (needed for an
            endless loader); ``None`` uses all of them.
        space: ``'training'`` (w.r.t. the trainable parameters: the factors of
            an ExpandNet) or ``'compact'`` (w.r.t. the effective compact weights:
            every expanded layer contracted, see :func:`compact_form`).
        bn: ``'train'``: ``model.train()``, batch norm on batch statistics (what
            a training step sees); ``'eval'``: ``model.train()`` but batch norm
            on its running statistics.
        store_dir: Write the gradient vectors there as ``.npy`` files instead of
            holding them in memory (N x params x 4 bytes); removed afterwards.
        progress: Called as ``progress(index, loss)`` after each batch.

    Returns:
        A :class:`GradientConfusionResult`.

    Raises:
        ValueError: For an unknown ``space`` / ``bn``, or fewer than 2 batches.
        RuntimeError: If ``space='compact'`` and an expanded layer cannot
            contract, or the loss reaches no parameter.
    """
    if space not in SPACES:
        raise ConfigError(f'gradient_confusion: space={space!r} must be one of {SPACES}')
    if bn not in BN_MODES:
        raise ConfigError(f'gradient_confusion: bn={bn!r} must be one of {BN_MODES}')
    store = _VectorStore(store_dir)
    losses: list[float] = []
    swap = compact_form(model) if space == 'compact' else contextlib.nullcontext()
    try:
        # Plain autograd: deferred factor gradients would hide the factors
        # from torch.autograd.grad.
        with analysis_mode(model, training=True, bn_eval=bn == 'eval'), swap, \
                deferred_factor_grads(model, enabled=False):
            named = gradient_parameters(model)
            if not named:
                raise SetupError('gradient_confusion: the model has no trainable parameter')
            params = [p for _, p in named]
            num_params = sum(p.numel() for p in params)
            for index, batch in enumerate(_take(batches, num_batches, 'gradient_confusion')):
                loss, flat = flat_gradient(model, batch, loss_fn, params)
                store.add(flat)
                losses.append(loss)
                if progress is not None:
                    progress(index, loss)
        if len(store) < 2:
            raise ConfigError(f'gradient_confusion: got {len(store)} batch(es); pairs need '
                              'at least 2 (raise num_batches or give more data)')
        gram = store.gram()
    finally:
        store.clear()
    return GradientConfusionResult(gram=gram, losses=losses, space=space,
                                   num_params=num_params, bn=bn)


# ------------------------------------------------------------------ mm adapters

def mm_loss_fn(preprocess: bool = True, training: bool = True) -> LossFn:
    """The training loss of an MMEngine ``BaseModel`` as ``loss_fn(model, data)``.

    ``data`` is a batch as a dataloader yields it (``inputs`` and
    ``data_samples``); the closure runs ``model.data_preprocessor(data,
    training)`` (unless ``preprocess=False``: ``data`` is already
    preprocessed, see :func:`mm_preprocess`), ``model(**data, mode='loss')``
    and ``model.parse_losses`` -- the loss a ``train_step`` back-propagates.

    Args:
        preprocess: Run the model's data preprocessor on each batch.
        training: The preprocessor's ``training`` flag (batch augmentations).

    Returns:
        The loss function.
    """
    def loss_fn(model: nn.Module, data: Any) -> Tensor:
        if preprocess:
            data = model.data_preprocessor(data, training)
        losses = model(**data, mode='loss') if isinstance(data, dict) else \
            model(*data, mode='loss')
        loss, _ = model.parse_losses(losses)
        return loss

    return loss_fn


@torch.no_grad()
def mm_preprocess(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
                  training: bool = True) -> list[Any]:
    """Run ``model.data_preprocessor`` once on each batch and keep the results.

    For analyses that evaluate the same batches many times (the loss
    landscape): the batches are then fixed, whatever random batch
    augmentation the preprocessor does.

    Args:
        model: An MMEngine ``BaseModel``.
        batches: Dataloader batches.
        num_batches: Take the first ``num_batches`` (``None``: all).
        training: The preprocessor's ``training`` flag.

    Returns:
        The preprocessed batches, for :func:`mm_loss_fn` with ``preprocess=False``.
    """
    return [model.data_preprocessor(b, training)
            for b in _take(batches, num_batches, 'mm_preprocess')]


def check_checkpoint_fits(model: nn.Module, checkpoint: str) -> None:
    """Refuse a checkpoint that would leave some of ``model``'s weights as initialised.

    MMEngine's ``load_checkpoint`` is non-strict: a checkpoint of another model
    would only log a warning, and an analysis of the untrained model would
    follow. The checkpoint must be the model's own (a training-time wrapper's,
    or its deployable network's alone), in the expanded or the compact form for
    an ExpandNet. A channel-planting checkpoint saved before the last stage is
    refused as ``tools/test.py`` refuses it: the network that was trained masks
    its unplanted channels with hooks the weights do not carry, so loading it
    would analyse the full-width network instead; its ``*_compact.pth`` is that
    trained network.

    Raises:
        CheckpointError: For an unreadable file, one that does not fit (naming
            the keys), or one saved mid-way through channel planting.
    """
    from ..checkpoint import (check_plain_model_checkpoint, match_state_dict,
                              read_checkpoint, strip_prefix)
    from ..models.deployable import find_deployable
    from ..planting import refuse_unfinished_planting
    from ..surgery import expanded_layers
    # Memory-mapped: meta, keys and shapes are all the check needs; the runner reads it next.
    saved = read_checkpoint(checkpoint, mmap=True)
    refuse_unfinished_planting(saved.get('meta') or {}, checkpoint, 'Analyse')
    state_dict = strip_prefix(saved['state_dict'])
    deployable, prefix = find_deployable(model)
    if prefix and any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if expanded_layers(deployable):
        match_state_dict(deployable, state_dict, strict=True, source=checkpoint)
    else:
        check_plain_model_checkpoint(deployable, state_dict, checkpoint)


def build_mm_model_and_loader(cfg: Any, checkpoint: str | None = None, *,
                              seed: int = 0, work_dir: str | None = None,
                              init_weights: bool = True) -> tuple[nn.Module, Iterable[Any]]:
    """The model and train dataloader of an MMEngine config, as training would start.

    Builds a ``Runner`` from ``cfg`` (custom imports such as ``expand_mm``,
    the default scope, the ``ExpandNet`` builder), initialises the weights as
    ``runner.train()`` does (``init_weights()``: for an ExpandNet the compact
    form, then the factors), then loads ``checkpoint`` if given (checked to fit
    first: :func:`check_checkpoint_fits`) through
    ``runner.load_checkpoint`` (with the hooks: an ExpandNet accepts a compact
    checkpoint and factorises it exactly). The global RNGs are then seeded
    again and the train dataloader is built with ``seed``, so two configs over
    the same data yield the same batches (same order, same random transforms).

    Args:
        cfg: An ``mmengine.Config`` (modified: ``randomness.seed``,
            ``work_dir``, ``load_from``, ``resume``).
        checkpoint: Training or compact checkpoint, or ``None``.
        seed: Random seed of the runner (weights init, data order).
        work_dir: The runner's work dir (logs); default ``cfg.work_dir`` or
            ``work_dirs/analysis``.
        init_weights: Run ``init_weights()`` before loading (it may load
            pretrained weights named in the config).

    Returns:
        ``(model, dataloader)``: the deployable model (unwrapped) and the
        train dataloader.
    """
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner, set_random_seed

    from ..models import deployable_model

    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join('work_dirs', 'analysis')
    cfg.load_from = None
    cfg.resume = False
    runner = Runner.from_cfg(cfg)
    model = deployable_model(runner.model)
    if init_weights and callable(getattr(model, 'init_weights', None)):
        model.init_weights()
    if checkpoint:
        if '://' not in checkpoint:  # a remote file is read by MMEngine's loader only
            check_checkpoint_fits(runner.model, checkpoint)
        runner.load_checkpoint(checkpoint, map_location='cpu')
    # Re-seeded after the weights: the data transforms draw from the global
    # RNGs, and the model's initialisation (which differs between a compact
    # model and its ExpandNet) must not shift the batches they produce.
    set_random_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=runner.seed)
    return model, loader
