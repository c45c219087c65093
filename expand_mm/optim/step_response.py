"""How far one sign-like (Adam) step of its factors moves an expanded layer's composed kernel.

Adam's first step moves every entry of a tensor by its rate times the sign of
the entry's gradient. For an expanded layer, whose composed kernel is
multilinear in its factors, the first-order move of the kernel under such a
step is computed here exactly, in float64, for Gaussian kernel gradients
pulled back to the factors. The per-factor rate rules read it:
:mod:`~expand_mm.optim.lr_calibration` (``factor_lr='calibrated'``) and the
``'kernel_step'`` rule of :mod:`~expand_mm.optim.factor_lr`.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from ..layers import ExpandedLayer

# Gaussian gradient draws averaged per layer: the response varies by a few
# percent between draws (sign patterns of large random matrices concentrate).
RESPONSE_DRAWS = 2


def rms(tensor: Tensor) -> float:
    """Root mean square of the entries, in float64."""
    return float(tensor.detach().double().pow(2).mean().sqrt())


def _factor_weights(layer: ExpandedLayer) -> list[Tensor]:
    return [sub.weight for sub in layer.sublayers]


def composed_weight(layer: ExpandedLayer) -> Tensor:
    """The composed kernel, freshly composed (no cache, no deferred leaves)."""
    return layer._compose(None)[0]


def _kernel_with_factor(layer: ExpandedLayer, index: int, value: Tensor) -> Tensor:
    """The composed kernel with factor ``index``'s weight replaced by ``value``."""
    weight = layer.sublayers[index].weight
    saved = weight.data
    weight.data = value
    try:
        return composed_weight(layer)
    finally:
        weight.data = saved


def sign_step_response(layer: ExpandedLayer, shares: list[float],
                       draws: int = RESPONSE_DRAWS, seed: int = 0) -> float:
    """Per-entry RMS move of the composed kernel per unit rate, under sign steps.

    Each factor ``i`` steps by ``shares[i] * sign(G_i)``, where ``G_i`` is a
    Gaussian gradient of the composed kernel pulled back to the factor; the
    first-order move of the kernel is exact (the composition is multilinear in
    the factors' weights). Computed on a float64 copy of the layer, so the
    layer itself is untouched.

    Args:
        layer: The expanded layer.
        shares: Rate multiplier of each sub-layer (first first).
        draws: Gradient draws averaged.
        seed: Seed of the draws (the result is deterministic).

    Returns:
        The response ``R`` (``rms`` of the kernel's move, in units of the rate).
    """
    return _response_of_copy(copy.deepcopy(layer).double().eval(), shares, draws, seed)


def orthogonal_step_response(layer: ExpandedLayer, shares: list[float]) -> float:
    """:func:`sign_step_response` of ``layer``'s chain with orthogonal factors.

    A float64 copy gets factors of the layer's own norms and equal singular
    values (``init='orthogonal'``, the default start) before it is measured,
    so the response is that of the chain's shapes and its factors' norms,
    whatever values the layer holds when the optimizer is built (before
    ``init_weights`` and ``load_from``).
    """
    probe = copy.deepcopy(layer).double().eval()
    probe.orthogonalise_factors(generator=torch.Generator(device='cpu').manual_seed(0))
    return _response_of_copy(probe, shares, RESPONSE_DRAWS, 0)


def _response_of_copy(ref: ExpandedLayer, shares: list[float], draws: int, seed: int) -> float:
    """:func:`sign_step_response` of ``ref``, a float64 copy it may change."""
    factors = _factor_weights(ref)
    generator = torch.Generator(device='cpu').manual_seed(seed)
    responses = []
    for _ in range(draws):
        with torch.enable_grad():
            kernel = composed_weight(ref)
            grad = torch.randn(kernel.shape, generator=generator, dtype=kernel.dtype)
            pulled = torch.autograd.grad(kernel, factors, grad.to(kernel.device))
        with torch.no_grad():
            move = sum(share * _kernel_with_factor(ref, i, g.sign())
                       for i, (share, g) in enumerate(zip(shares, pulled)))
        responses.append(rms(move))
    return math.fsum(responses) / len(responses)
