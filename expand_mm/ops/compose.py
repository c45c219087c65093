"""Compose chains of linear layers into one layer.

Conventions (PyTorch's): a conv kernel has shape ``(out, in / groups, kh, kw)``
and is applied as a cross-correlation; a linear weight has shape ``(out, in)``.
"first" is the sub-layer applied first to the input.

Composing conv kernels is exact when, between the sub-layers, there is no
padding and no nonlinearity, every sub-layer except the last non-1x1 one has
stride 1 (1x1 kernels commute with subsampling), and every non-1x1 kernel has the
same dilation: the composition of the undilated kernels, dilated, is then the
compact kernel. Strides and dilations are layer attributes and are not seen
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# A composition order: a leaf is the index of a sub-layer, a node is
# ``(first_part, second_part)``.
ChainTree = Union[int, tuple['ChainTree', 'ChainTree']]

# Largest per-group contracted width composed by broadcasting instead of a
# batched GEMM (see compose_conv_kernels).
_SMALL_CONTRACTION = 8


def _check_groups(first: Tensor, second: Tensor, groups: int) -> tuple[int, int, int]:
    """Per-group ``(in, mid, out)`` widths of ``second o first``."""
    mid, in_g = first.shape[0], first.shape[1]
    out, mid_g = second.shape[0], second.shape[1]
    if mid % groups or out % groups or mid // groups != mid_g:
        raise ValueError(
            f'kernels {tuple(first.shape)} then {tuple(second.shape)} do not chain '
            f'with groups={groups}')
    return in_g, mid_g, out // groups


class _ContractMiddleAxis(torch.autograd.Function):
    """``out[g, n, c, u] = sum_m later[g, n, m, u] * first[g, m, c]``, saving only the inputs.

    The contracted axis ``m`` of ``later`` (the big k x k factor of a CL chain)
    sits between two others, so a batched GEMM needs a permuted copy of it;
    under plain autograd (``torch.einsum``) that copy -- as large as the factor
    -- is what backward keeps, for every expanded layer, from the forward pass
    to the backward pass. Here only the inputs (the parameters themselves) are
    saved. With one group, both the product and the gradient of ``later`` are
    1x1 convolutions over ``later`` seen as a batch of ``n`` images of ``m``
    channels, which read it in place. Its backward is made of differentiable ops,
    so second-order gradients (``create_graph=True``: gradient penalties) are exact too.
    """

    @staticmethod
    def forward(ctx, later: Tensor, first: Tensor) -> Tensor:
        """``later (g, n, m, u)`` contracted with ``first (g, m, c)`` over ``m``: ``(g, n, c, u)``."""
        ctx.save_for_backward(later, first)
        # float64 (contraction) has no fast conv kernel on CPU; the GEMM is.
        if first.shape[0] == 1 and later.dtype != torch.float64:
            _, n, m, u = later.shape
            c = first.shape[-1]
            weight = first[0].t().reshape(c, m, 1, 1)
            return F.conv2d(later[0].reshape(n, m, u, 1), weight).reshape(1, n, c, u)
        return torch.einsum('gnmu,gmc->gncu', later, first)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Gradients of ``later`` and ``first`` from the saved inputs (no saved product)."""
        saved_later, saved_first = ctx.saved_tensors
        # Under autocast the forward ran in low precision: so does backward,
        # and each gradient comes back in its input's dtype.
        later, first = saved_later.to(grad.dtype), saved_first.to(grad.dtype)
        grad_later = grad_first = None
        if ctx.needs_input_grad[0]:
            if first.shape[0] == 1 and grad.dtype != torch.float64:
                _, n, c, u = grad.shape
                m = first.shape[1]
                grad_later = F.conv2d(grad[0].reshape(n, c, u, 1),
                                      first[0].reshape(m, c, 1, 1)).reshape(1, n, m, u)
            else:
                grad_later = torch.einsum('gncu,gmc->gnmu', grad, first)
        if ctx.needs_input_grad[1]:
            grad_first = torch.einsum('gncu,gnmu->gmc', grad, later).to(saved_first.dtype)
        if grad_later is not None:
            grad_later = grad_later.to(saved_later.dtype)
        return grad_later, grad_first


def compose_conv_kernels(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Compose two conv kernels: ``conv(conv(x, first), second) == conv(x, K)``.

    Grouped kernels are composed per group, batched over the groups. A 1x1
    operand makes the composition a per-group matrix product; otherwise it is a
    full 2-D convolution of the kernels over the spatial axes, computed with one
    grouped ``conv2d``.

    Args:
        first: ``(M, C / g, ah, aw)``, applied first.
        second: ``(N, M / g, bh, bw)``, applied second.
        groups: ``g``, shared by both convs.

    Returns:
        ``(N, C / g, ah + bh - 1, aw + bw - 1)``.
    """
    in_g, mid_g, out_g = _check_groups(first, second, groups)
    g = groups
    ah, aw = first.shape[-2:]
    bh, bw = second.shape[-2:]
    if ah == aw == 1 or bh == bw == 1:
        # A 1x1 kernel is a matrix: reshape (a view, free in backward), never
        # index it (select's backward fills and copies a full-size gradient).
        hw = (bh, bw) if ah == aw == 1 else (ah, aw)
        a = first.reshape(g, mid_g, in_g, -1)
        b = second.reshape(g, out_g, mid_g, -1)
        if g > 1 and mid_g <= _SMALL_CONTRACTION:
            # Many groups with tiny matrices (depthwise: mid_g = ratio): one
            # broadcast product and a sum beat a batched GEMM of g tiny matrices
            # by ~2.5x, forward and backward.
            out = (b.unsqueeze(3) * a.unsqueeze(1)).sum(2)
        elif ah == aw == 1:
            out = _ContractMiddleAxis.apply(b, a.squeeze(-1))
        else:
            out = torch.einsum('gnm,gmcu->gncu', b.squeeze(-1), a)
        return out.reshape(g * out_g, in_g, *hw)
    a = first.reshape(g, mid_g, in_g, ah, aw)
    b = second.reshape(g, out_g, mid_g, bh, bw)
    # K[n, c, w] = sum_m sum_u first[m, c, u] second[n, m, w - u]: a conv2d with
    # `second` as the batch of inputs (n) over channels (m) and the flipped,
    # transposed `first` as weight, padded by its size - 1.
    x = b.transpose(0, 1).reshape(out_g, g * mid_g, bh, bw)
    w = a.transpose(1, 2).flip(-2, -1).reshape(g * in_g, mid_g, ah, aw)
    out = F.conv2d(x, w, padding=(ah - 1, aw - 1), groups=g)
    hh, ww = out.shape[-2:]
    return out.reshape(out_g, g, in_g, hh, ww).transpose(0, 1).reshape(
        g * out_g, in_g, hh, ww)


def chain_order(channels: Sequence[int],
                kernel_sizes: Sequence[tuple[int, int]] | None = None,
                groups: int = 1) -> tuple[ChainTree, int]:
    """Cheapest order to compose a chain (matrix-chain dynamic programme).

    Composing a part mapping ``c`` to ``m`` channels with spatial extent ``A``
    with a part mapping ``m`` to ``n`` with extent ``B`` costs
    ``g * (n/g) * (m/g) * (c/g) * A * B`` multiply-adds. The cost depends on
    channels and kernel sizes only, never on batch or image size.

    Args:
        channels: ``L + 1`` widths: input of the first sub-layer, then the
            output of each sub-layer.
        kernel_sizes: ``L`` pairs ``(kh, kw)``; ``None`` for linear layers.
        groups: ``g``, shared by every sub-layer.

    Returns:
        ``(tree, cost)``: the composition order and its multiply-add count.
    """
    n_layers = len(channels) - 1
    if n_layers < 1:
        raise ValueError('a chain needs at least one layer')
    sizes = tuple(kernel_sizes) if kernel_sizes is not None else ((1, 1),) * n_layers
    if len(sizes) != n_layers:
        raise ValueError(f'{len(channels)} widths need {n_layers} kernel sizes, '
                         f'got {len(sizes)}')
    return _chain_order(tuple(c // groups for c in channels), sizes, groups)


@lru_cache(maxsize=256)
def _chain_order(dims: tuple[int, ...], sizes: tuple[tuple[int, int], ...],
                 groups: int) -> tuple[ChainTree, int]:
    n = len(sizes)

    def area(i: int, j: int) -> int:
        return ((1 + sum(s[0] - 1 for s in sizes[i:j + 1])) *
                (1 + sum(s[1] - 1 for s in sizes[i:j + 1])))

    best: dict[tuple[int, int], tuple[ChainTree, int]] = {
        (i, i): (i, 0) for i in range(n)}
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            options = []
            for s in range(i, j):
                (lt, lc), (rt, rc) = best[(i, s)], best[(s + 1, j)]
                cost = (lc + rc + groups * dims[j + 1] * dims[s + 1] * dims[i] *
                        area(i, s) * area(s + 1, j))
                options.append((cost, s, (lt, rt)))
            cost, _, tree = min(options, key=lambda o: (o[0], o[1]))
            best[(i, j)] = (tree, cost)
    return best[(0, n - 1)]


def _sequential_tree(n: int) -> ChainTree:
    tree: ChainTree = 0
    for i in range(1, n):
        tree = (tree, i)
    return tree


def compose_conv_chain(kernels: Sequence[Tensor], groups: int = 1,
                       order: str = 'cheapest') -> Tensor:
    """Compose a chain of conv kernels into one kernel.

    Args:
        kernels: ``L`` kernels, first applied first; kernel ``i`` has shape
            ``(c[i+1], c[i] / g, kh_i, kw_i)``.
        groups: ``g``, shared by every sub-layer.
        order: ``'cheapest'`` (see :func:`chain_order`) or ``'sequential'``
            (left to right). Both give the same kernel up to rounding.

    Returns:
        ``(c[L], c[0] / g, 1 + sum(kh_i - 1), 1 + sum(kw_i - 1))``.
    """
    if not kernels:
        raise ValueError('cannot compose an empty chain')
    if order == 'cheapest':
        channels = [kernels[0].shape[1] * groups] + [k.shape[0] for k in kernels]
        sizes = [(int(k.shape[-2]), int(k.shape[-1])) for k in kernels]
        tree, _ = chain_order(channels, sizes, groups)
    elif order == 'sequential':
        tree = _sequential_tree(len(kernels))
    else:
        raise ValueError(f"order must be 'cheapest' or 'sequential', got {order!r}")

    return _evaluate_tree(tree, kernels,
                          lambda first, then: compose_conv_kernels(first, then, groups))


def compose_linear_chain(weights: Sequence[Tensor], order: str = 'cheapest') -> Tensor:
    """Compose a chain of linear weights: ``W_L @ ... @ W_1``.

    Args:
        weights: ``L`` matrices, first applied first; ``W_i`` is ``(c[i+1], c[i])``.
        order: ``'cheapest'`` (matrix-chain order) or ``'sequential'``.

    Returns:
        ``(c[L], c[0])``.
    """
    if not weights:
        raise ValueError('cannot compose an empty chain')
    if order == 'cheapest':
        tree, _ = chain_order([weights[0].shape[1]] + [w.shape[0] for w in weights])
    elif order == 'sequential':
        tree = _sequential_tree(len(weights))
    else:
        raise ValueError(f"order must be 'cheapest' or 'sequential', got {order!r}")

    return _evaluate_tree(tree, weights, lambda first, then: then @ first)


def _evaluate_tree(node: ChainTree, leaves: Sequence[Tensor],
                   combine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Compose ``leaves`` in the order ``node`` gives; ``combine(first, then)``.

    A plain recursive function, not a closure calling itself: such a closure
    is a reference cycle that keeps ``leaves`` (e.g. float64 copies of a large
    layer's factors) alive until the garbage collector's next full pass.
    """
    if isinstance(node, int):
        return leaves[node]
    return combine(_evaluate_tree(node[0], leaves, combine),
                   _evaluate_tree(node[1], leaves, combine))
