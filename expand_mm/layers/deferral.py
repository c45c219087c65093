"""``deferred_factor_grads(model)``: switch a model's expanded layers to deferred gradients.

The engine itself (one composition per step, factor gradients at the end of the
backward pass) is :mod:`expand_mm.layers.deferred_grads`; this is the switch a
training step wraps around its forward and backward passes.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from torch import nn

from .base import ExpandedLayer
from .deferred_grads import deferral_unsupported_reason, discard_deferred_factor_grads


@contextlib.contextmanager
def deferred_factor_grads(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the online expanded layers of ``model`` defer their factor gradients.

    Each online layer composes its weight once per step and its factors get their
    gradients at the end of the backward pass, once the activations are freed:
    the same gradients as plain autograd at a lower peak memory (see
    :class:`~expand_mm.layers.ExpandedLayer`). Meant for a block that ends in
    ``loss.backward()`` (an MMEngine ``train_step``); ``torch.autograd.grad``
    on the factors needs the plain mode. The layers' own settings come back on
    exit, and what a backward pass that raised inside the block left queued is
    dropped.

    On a torch build without the autograd hooks deferral needs (see
    :func:`deferral_unsupported_reason`) the block warns once and leaves the
    layers on plain autograd: the same gradients at the higher peak memory.

    Args:
        model: Any module; its expanded layers are switched.
        enabled: Defer (``True``) or keep plain autograd (``False``) inside the block.

    Yields:
        The number of expanded layers switched.
    """
    layers = [module for module in model.modules() if isinstance(module, ExpandedLayer)]
    if enabled and layers:
        reason = deferral_unsupported_reason()
        if reason is not None:
            warnings.warn(f'deferred factor gradients are off: {reason}; the expanded '
                          f'layers train with plain autograd (same gradients, higher '
                          f'peak memory). Set defer_factor_grads=False in the ExpandNet '
                          f'model config to silence this.', RuntimeWarning, stacklevel=3)
            enabled = False
    settings = [layer.defer_factor_grads for layer in layers]
    for layer in layers:
        layer.defer_factor_grads = enabled
    try:
        yield len(layers)
    finally:
        for layer, value in zip(layers, settings):
            layer.defer_factor_grads = value
        # A backward pass that raised inside the block left its compositions
        # queued; nothing will flush them.
        discard_deferred_factor_grads(layers)
