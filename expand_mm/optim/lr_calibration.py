"""Per-layer factor learning rates calibrated from the layer's own values.

The rule (``paramwise_cfg.factor_lr='calibrated'``): *one step of an
adaptive optimizer moves an expanded layer's composed kernel by the same
relative amount as it moves the compact layer the expansion replaces.*

Derivation. Adam's (and AdamW's, RMSprop's after its warm-up) first step moves
every entry of a tensor by ``lr`` times the sign of its gradient. The compact
kernel ``W_c`` therefore moves by ``lr`` per entry: a relative step of
``lr / rms(W_c)``. An expanded layer's kernel ``W = f(F_1, ..., F_L)`` is
multilinear in its factors, so a step ``dF_i = lr * m_i * sign(G_i)`` of each
factor (``G_i`` its gradient, ``m_i`` its rate multiplier) moves ``W`` to
first order by ``lr * sum_i m_i f(F_1, .., sign(G_i), .., F_L)``. With
``m_i = c * s_i`` (``s_i``: the fan-in shape of :func:`factor_lr_multipliers`,
which evens out the factors' own relative steps) the relative step of ``W``
is ``c * lr * R / rms(W)``, where ``R`` is the per-entry RMS of
``sum_i s_i f(.., sign(G_i), ..)`` -- computed here exactly, in float64, for
Gaussian kernel gradients ``G`` (``G_i`` is ``G`` pulled back to factor ``i``).
Equating the two relative steps gives the layer's scale::

    c = rms(W) / (rms(W_ref) * R)

``W_ref`` is the compact layer the step is compared with: the compact kernel
the model's own initialisation gave that layer (its ``init_cfg``: mmcv's
kaiming for a ``ConvModule``, a head's ``Normal(std=0.01)``, ...) when the
factors are fresh, and ``W`` itself when they were factorised from a compact
kernel (``init='compact'``, a pretrained or compact checkpoint), where the
compact layer would start from that same kernel. Nothing is tuned per task;
SGD, whose step scales with the gradient, keeps the rates as they are.

Experimental: it matches one step, but whole trainings on the digits tasks
end far below the fixed ``'fan_in'`` rule (``docs/studies.md``), so it is
opt-in and ``'auto'`` does not pick it.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from ..layers import ExpandedLayer
from .factor_lr import factor_lr_multipliers

# Gaussian gradient draws averaged per layer: the response varies by a few
# percent between draws (sign patterns of large random matrices concentrate).
CALIBRATION_DRAWS = 2


def rms(tensor: Tensor) -> float:
    """Root mean square of the entries, in float64."""
    return float(tensor.detach().double().pow(2).mean().sqrt())


def _factor_weights(layer: ExpandedLayer) -> list[Tensor]:
    return [sub.weight for sub in layer.sublayers]


def _composed_weight(layer: ExpandedLayer) -> Tensor:
    """The composed kernel, freshly composed (no cache, no deferred leaves)."""
    return layer._compose(None)[0]


def _kernel_with_factor(layer: ExpandedLayer, index: int, value: Tensor) -> Tensor:
    """The composed kernel with factor ``index``'s weight replaced by ``value``."""
    weight = layer.sublayers[index].weight
    saved = weight.data
    weight.data = value
    try:
        return _composed_weight(layer)
    finally:
        weight.data = saved


def sign_step_response(layer: ExpandedLayer, shares: list[float],
                       draws: int = CALIBRATION_DRAWS, seed: int = 0) -> float:
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
    ref = copy.deepcopy(layer).double().eval()
    factors = _factor_weights(ref)
    generator = torch.Generator(device='cpu').manual_seed(seed)
    responses = []
    for _ in range(draws):
        with torch.enable_grad():
            kernel = _composed_weight(ref)
            grad = torch.randn(kernel.shape, generator=generator, dtype=kernel.dtype)
            pulled = torch.autograd.grad(kernel, factors, grad.to(kernel.device))
        with torch.no_grad():
            move = sum(share * _kernel_with_factor(ref, i, g.sign())
                       for i, (share, g) in enumerate(zip(shares, pulled)))
        responses.append(rms(move))
    return math.fsum(responses) / len(responses)


def calibration_scale(layer: ExpandedLayer, reference_rms: float, shares: list[float]) -> float:
    """The layer's scale ``c`` (module docstring): its relative step equals the compact one's.

    Args:
        layer: The expanded layer, at the values training starts from.
        reference_rms: ``rms(W_ref)`` of the compact kernel compared with.
        shares: The fan-in shape of the factor multipliers.

    Returns:
        ``rms(W) / (reference_rms * R)``.
    """
    with torch.no_grad():
        kernel_rms = rms(_composed_weight(layer))
    return kernel_rms / (reference_rms * sign_step_response(layer, shares))


def reference_rms(layer: ExpandedLayer) -> float:
    """``rms(W_ref)``: the compact kernel the layer stands for, else its own composed one.

    :meth:`~expand_mm.layers.ExpandedLayer.remember_compact_reference` records
    it when the layer is built from a compact layer, factorised from a compact
    kernel, or initialised by an ExpandNet's ``init_weights``.
    """
    if layer.compact_reference_rms:
        return layer.compact_reference_rms
    with torch.no_grad():
        return rms(_composed_weight(layer))


def calibrated_scale(layer: ExpandedLayer) -> float:
    """The scale ``c`` of the layer's fan-in-shaped factor rates under the calibrated rule."""
    return calibration_scale(layer, reference_rms(layer),
                             factor_lr_multipliers(layer, 'fan_in', 'sum'))


def calibrated_multipliers(layer: ExpandedLayer) -> list[float]:
    """Learning-rate multiplier of each factor under the calibrated rule.

    Args:
        layer: The expanded layer, at the values training starts from.

    Returns:
        One multiplier per sub-layer, first sub-layer first: the fan-in shape
        of :func:`factor_lr_multipliers` times :func:`calibrated_scale`.
    """
    shares = factor_lr_multipliers(layer, 'fan_in', 'sum')
    scale = calibration_scale(layer, reference_rms(layer), shares)
    return [share * scale for share in shares]
