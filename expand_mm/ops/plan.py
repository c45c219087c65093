"""Shapes of expansion chains and padding amounts (integer maths, no tensors).

These helpers decide what an expanded chain looks like; the tensor maths that
composes or factorises the chain lives in :mod:`expand_mm.ops.compose`,
:mod:`expand_mm.ops.bias` and :mod:`expand_mm.ops.factorize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size2 = tuple[int, int]


def to_pair(value: int | Sequence[int], what: str = 'value') -> Size2:
    """Normalise an int or a length-2 sequence to a pair of ints.

    Args:
        value: ``k`` or ``(kh, kw)``.
        what: Name used in the error message.

    Returns:
        ``(kh, kw)``.
    """
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f'{what} must be an int or a pair, got {value!r}')
    return pair  # type: ignore[return-value]


def cl_channels(in_channels: int, out_channels: int, ratio: int) -> list[int]:
    """Channel widths of a CL chain ``1x1 -> kxk -> 1x1``.

    Args:
        in_channels: ``m``, input channels of the compact conv.
        out_channels: ``n``, output channels of the compact conv.
        ratio: ``r``, expansion ratio.

    Returns:
        ``[m, r*m, r*n, n]``: input width followed by each sub-layer's output width.
    """
    return [in_channels, ratio * in_channels, ratio * out_channels, out_channels]


def cl_kernel_sizes(kernel_size: int | Sequence[int]) -> list[Size2]:
    """Kernel sizes of a CL chain: ``[(1, 1), (kh, kw), (1, 1)]``."""
    return [(1, 1), to_pair(kernel_size, 'kernel_size'), (1, 1)]


def ck_depth(kernel_size: int | Sequence[int]) -> int:
    """Number of sub-convs of a CK chain: ``max((kh - 1) / 2, (kw - 1) / 2)``.

    Raises:
        ValueError: If a side is even or the largest side is below 5 (a 3x3 has
            no CK expansion: it would be a single 3x3).
    """
    kh, kw = to_pair(kernel_size, 'kernel_size')
    if kh % 2 == 0 or kw % 2 == 0 or max(kh, kw) < 5:
        raise ValueError(
            f'CK needs odd kernel sides with the largest >= 5, got {(kh, kw)}')
    return max((kh - 1) // 2, (kw - 1) // 2)


def ck_kernel_sizes(kernel_size: int | Sequence[int]) -> list[Size2]:
    """Kernel sizes of a CK chain whose composition is exactly ``kernel_size``.

    Each axis gets ``(k - 1) / 2`` sub-kernels of size 3 and size 1 for the rest;
    the 3s sit at the end of the chain so the last sub-conv is as wide as
    possible on every axis, which keeps the exact factorisation
    (:func:`expand_mm.ops.factorize.factorize_ck`) cheap in channels.

    Args:
        kernel_size: ``k`` or ``(kh, kw)``, odd sides, largest >= 5.

    Returns:
        ``L`` pairs, e.g. ``(3, 7) -> [(1, 3), (1, 3), (3, 3)]``.
    """
    kh, kw = to_pair(kernel_size, 'kernel_size')
    depth = ck_depth((kh, kw))
    n3h, n3w = (kh - 1) // 2, (kw - 1) // 2
    return [(3 if i >= depth - n3h else 1, 3 if i >= depth - n3w else 1)
            for i in range(depth)]


def ck_channels(in_channels: int, out_channels: int, ratio: int,
                depth: int) -> list[int]:
    """Channel widths of a CK chain of ``depth`` sub-convs.

    The first intermediate width is ``r*m``, later ones ``r*n``.

    Returns:
        ``[m, r*m, r*n, ..., r*n, n]`` (``depth + 1`` entries).
    """
    if depth < 2:
        raise ValueError(f'a CK chain has at least 2 sub-convs, got {depth}')
    return ([in_channels, ratio * in_channels] +
            [ratio * out_channels] * (depth - 2) + [out_channels])


def ck_anchors(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Anchors of the exact CK factorisation along one axis.

    The first ``L - 1`` sub-kernels realise a one-hot shift to each anchor ``a``;
    the last sub-kernel (size ``t``) carries the window ``a .. a + t - 1`` of the
    compact kernel. Anchors are ``0, t, 2t, ...`` clamped to the reach of the
    first ``L - 1`` sub-kernels, so the windows tile the axis.

    Args:
        sizes: Sub-kernel sizes along the axis (``L`` entries).

    Returns:
        ``(anchors, k)`` where ``k`` is the composed kernel size.
    """
    t = sizes[-1]
    reach = sum(s - 1 for s in sizes[:-1])
    k = reach + t
    count = math.ceil(k / t)
    return [min(j * t, reach) for j in range(count)], k


def padding_amounts(padding: int | Sequence[int] | str,
                    kernel_size: int | Sequence[int],
                    dilation: int | Sequence[int] = 1) -> tuple[int, int, int, int]:
    """Padding as ``F.pad`` amounts ``(left, right, top, bottom)``.

    Matches ``nn.Conv2d``: ``'same'`` puts the odd extra pixel on the right and
    bottom; ``'valid'`` is no padding.

    Args:
        padding: ``p``, ``(ph, pw)``, ``'same'`` or ``'valid'``.
        kernel_size: ``k`` or ``(kh, kw)``.
        dilation: ``d`` or ``(dh, dw)``.
    """
    if isinstance(padding, str):
        if padding == 'valid':
            return (0, 0, 0, 0)
        if padding != 'same':
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, "
                             f'got {padding!r}')
        (kh, kw), (dh, dw) = to_pair(kernel_size), to_pair(dilation)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = to_pair(padding, 'padding')
    return (pw, pw, ph, ph)
