"""Propagate the biases of a chain of linear layers to its output.

A bias ``b`` of a sub-layer is a constant image; a later conv with kernel ``K``
maps it to the constant ``(sum over space of K) @ b`` (per group), provided no
padding happens after the first sub-layer. So the chain's bias is folded from
the first sub-layer to the last: ``acc <- S_i @ acc + b_i``. A missing bias is
zero; an earlier bias keeps flowing through a later sub-layer without bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def conv_bias_through(bias: Tensor, kernel: Tensor, groups: int = 1) -> Tensor:
    """Output of a bias-free conv on the constant image ``bias``.

    Args:
        bias: ``(M,)``, the constant value per input channel.
        kernel: ``(N, M / g, kh, kw)``.
        groups: ``g``.

    Returns:
        ``(N,)``: ``sum_{u} kernel[n, m, u] * bias[m]`` per group.
    """
    out, in_g = kernel.shape[0], kernel.shape[1]
    if bias.shape != (in_g * groups,) or out % groups:
        raise ValueError(f'bias {tuple(bias.shape)} does not match kernel '
                         f'{tuple(kernel.shape)} with groups={groups}')
    s = kernel.sum(dim=(-2, -1)).reshape(groups, out // groups, in_g)
    return torch.einsum('gnm,gm->gn', s, bias.reshape(groups, in_g)).reshape(out)


def propagate_conv_bias(kernels: Sequence[Tensor], biases: Sequence[Tensor | None],
                        groups: int = 1) -> Tensor | None:
    """Bias of the composition of a chain of convs.

    Args:
        kernels: ``L`` kernels, first applied first; kernel ``i`` has shape
            ``(c[i+1], c[i] / g, kh_i, kw_i)``.
        biases: ``L`` entries of shape ``(c[i+1],)`` or ``None`` (zero).
        groups: ``g``, shared by every sub-layer.

    Returns:
        ``(c[L],)``, or ``None`` when every bias is ``None``.
    """
    if len(kernels) != len(biases):
        raise ValueError(f'{len(kernels)} kernels but {len(biases)} biases')
    acc: Tensor | None = None
    for kernel, bias in zip(kernels, biases):
        if acc is not None:
            acc = conv_bias_through(acc, kernel, groups)
        if bias is not None:
            acc = bias if acc is None else acc + bias
    return acc


def propagate_linear_bias(weights: Sequence[Tensor],
                          biases: Sequence[Tensor | None]) -> Tensor | None:
    """Bias of the composition of a chain of linear layers.

    Args:
        weights: ``L`` matrices, first applied first; ``W_i`` is ``(c[i+1], c[i])``.
        biases: ``L`` entries of shape ``(c[i+1],)`` or ``None`` (zero).

    Returns:
        ``(c[L],)``, or ``None`` when every bias is ``None``.
    """
    if len(weights) != len(biases):
        raise ValueError(f'{len(weights)} weights but {len(biases)} biases')
    acc: Tensor | None = None
    for weight, bias in zip(weights, biases):
        if acc is not None:
            acc = weight @ acc
        if bias is not None:
            acc = bias if acc is None else acc + bias
    return acc
