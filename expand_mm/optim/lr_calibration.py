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

import torch

from ..layers import ExpandedLayer
from .factor_lr import factor_lr_multipliers
from .step_response import composed_weight, rms, sign_step_response

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
        kernel_rms = rms(composed_weight(layer))
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
        return rms(composed_weight(layer))


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
