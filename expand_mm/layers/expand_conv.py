"""ExpandConv2d: a compact ``nn.Conv2d`` trained as a linear chain of convs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import (ck_channels, ck_depth, ck_exact_min_ratio, ck_kernel_sizes, cl_channels,
                   cl_kernel_sizes, compose_conv_chain, factorize_ck, factorize_cl,
                   padding_amounts, propagate_conv_bias, to_pair)
from .base import ExpandedLayer

PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')
STRATEGIES = ('cl', 'ck')


class ExpandConv2d(ExpandedLayer):
    """A ``k x k`` conv (``m -> n`` channels) expanded into a chain of linear convs.

    Strategies (``r`` = ``ratio``):

    - ``'cl'``: ``1x1 (m -> r*m)``, ``k x k (r*m -> r*n)``, ``1x1 (r*n -> n)``.
      Works for every kernel size, square or not, odd or even.
    - ``'ck'``: ``(k - 1) / 2`` chained 3x3 convs ``m -> r*m -> r*n -> ... -> n``
      (for ``k = 5``: ``m -> r*m -> n``). Odd kernels with the largest side
      ``>= 5`` only; a rectangular kernel uses 3 or 1 per axis so the sizes add
      up. A 3x3 has no CK expansion (it would be one 3x3): model-level ``'auto'``
      falls back to CL for it.

    Exactness rules: the original padding (any ``padding_mode``) is applied once
    to the input of the first sub-conv and every sub-conv has padding 0; the
    stride sits on the ``k x k`` (CL) or the last sub-conv (CK); the dilation on
    the ``k x k`` (CL) or every sub-conv (CK); every sub-conv keeps ``groups``
    (per-group widths grow by ``r``); sub-convs have biases iff the compact conv
    has one, and the contracted bias is the propagated sum of all of them.

    The sub-convs are plain ``nn.Conv2d`` in :attr:`convs` (state-dict keys
    ``convs.0.weight``, ...), freshly initialised as standalone convs of their
    shape. The attributes of ``nn.Conv2d`` are mirrored, and :attr:`weight` /
    :attr:`bias` return the composed compact kernel and bias.

    Args:
        in_channels: ``m``.
        out_channels: ``n``.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: As ``nn.Conv2d``.
        padding: As ``nn.Conv2d`` (int, pair, ``'same'``, ``'valid'``).
        dilation: As ``nn.Conv2d``.
        groups: As ``nn.Conv2d``.
        bias: Whether the compact conv (and so every sub-conv) has a bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        strategy: ``'cl'`` or ``'ck'``.
        ratio: Expansion ratio ``r >= 1``.
        mode: ``'online'`` or ``'explicit'``.
        name: Module path, used in error messages.
        device: Device of the sub-convs.
        dtype: Dtype of the sub-convs.

    Raises:
        ConfigError: On a bad ratio or mode, channels not divisible by ``groups``,
            an unknown padding or padding mode, or CK on an even or smaller-than-5
            kernel.
    """

    transposed = False

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] | str = 0,
                 dilation: int | Sequence[int] = 1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros',
                 *,
                 strategy: str = 'cl',
                 ratio: int = 4,
                 mode: str = 'online',
                 name: str | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(ratio=ratio, mode=mode, name=name)
        who = self._describe()
        if strategy not in STRATEGIES:
            raise ConfigError(f'{who}: strategy must be one of {STRATEGIES}, '
                              f'got {strategy!r}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(f'{who}: in_channels={in_channels} and out_channels='
                              f'{out_channels} must be divisible by groups={groups}')
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f'{who}: padding_mode must be one of {PADDING_MODES}, '
                              f'got {padding_mode!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_pair(kernel_size, 'kernel_size')
        self.stride = to_pair(stride, 'stride')
        self.dilation = to_pair(dilation, 'dilation')
        self.output_padding = (0, 0)
        if isinstance(padding, str):
            if padding not in ('same', 'valid'):
                raise ConfigError(f"{who}: padding must be 'same', 'valid', an int or "
                                  f'a pair, got {padding!r}')
            if padding == 'same' and self.stride != (1, 1):
                raise ConfigError(f"{who}: padding='same' needs stride 1 (as nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = to_pair(padding, 'padding')
        self.groups = groups
        self.padding_mode = padding_mode
        self.strategy = strategy
        self._pad = padding_amounts(self.padding, self.kernel_size, self.dilation)

        if strategy == 'cl':
            channels = cl_channels(in_channels, out_channels, ratio)
            sizes = cl_kernel_sizes(self.kernel_size)
            strides = [(1, 1), self.stride, (1, 1)]
            dilations = [(1, 1), self.dilation, (1, 1)]
        else:
            try:
                depth = ck_depth(self.kernel_size)
            except ValueError as err:
                raise ConfigError(
                    f"{who}: strategy='ck' cannot expand kernel_size={self.kernel_size}: "
                    f'{err}. A 3x3 has no CK expansion; use strategy=\'cl\', which '
                    f'works for every kernel size') from err
            channels = ck_channels(in_channels, out_channels, ratio, depth)
            sizes = ck_kernel_sizes(self.kernel_size)
            strides = [(1, 1)] * (depth - 1) + [self.stride]
            dilations = [self.dilation] * depth
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], sizes[i], stride=strides[i],
                      padding=0, dilation=dilations[i], groups=groups, bias=bias,
                      device=device, dtype=dtype) for i in range(len(sizes)))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, strategy: str = 'cl', ratio: int = 4,
                  mode: str = 'online', keep_weights: bool = False,
                  name: str | None = None,
                  generator: torch.Generator | None = None) -> 'ExpandConv2d':
        """Expand a compact conv.

        Args:
            conv: The compact ``nn.Conv2d`` (not modified).
            strategy: ``'cl'`` or ``'ck'``.
            ratio: Expansion ratio ``r``.
            mode: ``'online'`` or ``'explicit'``.
            keep_weights: Factorise ``conv``'s weights exactly (see
                :meth:`set_compact`) instead of a fresh init.
            name: Module path, used in error messages.
            generator: Optional RNG for the free factors of ``keep_weights``.

        Returns:
            The expanded layer on ``conv``'s device and dtype, in its train/eval
            state.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f'{name or "from_conv"}: expected an nn.Conv2d, '
                            f'got {type(conv).__name__}')
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, strategy=strategy, ratio=ratio,
                    mode=mode, name=name, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        layer.remember_compact_reference(conv.weight)
        if keep_weights:
            layer.set_compact(conv.weight, conv.bias, generator=generator)
        return layer.train(conv.training)

    @property
    def sublayers(self) -> nn.ModuleList:
        """The sub-convs, first applied first (same as :attr:`convs`)."""
        return self.convs

    def compact_weight_shape(self) -> tuple[int, int, int, int]:
        """``(n, m / groups, kh, kw)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _compose(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
        kernels = [c.weight if dtype is None else c.weight.to(dtype) for c in self.convs]
        biases = [None if c.bias is None else
                  (c.bias if dtype is None else c.bias.to(dtype)) for c in self.convs]
        weight = compose_conv_chain(kernels, self.groups)
        # The composition's strides depend on the order it took (some come out
        # channels-last). A conv follows its weight's memory format, so an
        # accidental one would switch the whole net's activation layout; give
        # the conv the layout the compact conv would have: that of the k x k
        # factor (channels-last only after model.to(memory_format=...)).
        ref = max(self.convs, key=lambda c: c.kernel_size[0] * c.kernel_size[1]).weight
        channels_last = _has_channels_last_strides(ref)
        if weight.stride() != _layout_strides(weight.shape, channels_last):
            # Not .contiguous(memory_format=...): a [C, 1, k, k] or [O, I, 1, 1] kernel
            # passes both layouts' tests and would keep strides a conv reads as the other.
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            weight = torch.empty_like(weight, memory_format=fmt).copy_(weight)
        return weight, propagate_conv_bias(kernels, biases, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` of shape ``(B, m, H, W)``."""
        if self._mode == 'explicit':
            if any(self._pad):
                x = F.pad(x, self._pad,
                          mode='constant' if self.padding_mode == 'zeros'
                          else self.padding_mode)
            for i, conv in enumerate(self.convs):
                if i and self.nonlinearity is not None:
                    x = self.nonlinearity(x)
                x = conv(x)
            return x
        weight, bias = self.composed()
        if self.padding_mode == 'zeros':
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return F.conv2d(F.pad(x, self._pad, mode=self.padding_mode), weight, bias,
                        self.stride, 0, self.dilation, self.groups)

    def contract(self) -> nn.Conv2d:
        """Return the compact ``nn.Conv2d`` computing the same function.

        Composed in float64 and cast back; same hyper-parameters, device, dtype,
        memory format and train/eval state as the compact conv this layer stands for.
        """
        self._check_linear('contract()')
        ref = self.convs[0].weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation,
                         groups=self.groups, bias=self._has_bias(),
                         padding_mode=self.padding_mode, device=ref.device,
                         dtype=ref.dtype)
        with torch.no_grad():
            weight, bias = self._compose(torch.float64)
            if _has_channels_last_strides(weight):  # the chain's layout (see _compose)
                conv.weight.data = torch.empty_like(conv.weight,
                                                    memory_format=torch.channels_last)
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv.train(self.training)

    def set_compact(self, weight: Tensor, bias: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Set the factors so the chain computes exactly the given compact conv.

        CL: per group, the first 1x1 has orthonormal columns, the last 1x1
        orthonormal rows, the ``k x k`` is ``C^T W A^T``. CK: one-hot shift
        kernels to anchors, then windows of ``W`` (see
        :func:`expand_mm.ops.factorize_ck`); the free intermediate channels keep
        their current values. Intermediate biases become 0, the last one
        ``bias`` (0 if ``None``).

        Args:
            weight: ``(n, m / groups, kh, kw)``.
            bias: ``(n,)`` or ``None``.
            generator: Optional RNG for the orthonormal CL factors.

        Raises:
            ConfigError: On a shape mismatch, a bias for a bias-free layer, or a
                CK ratio too small for the exact construction.
        """
        who = self._describe()
        if tuple(weight.shape) != self.compact_weight_shape():
            raise ConfigError(f'{who}: compact weight must have shape '
                              f'{self.compact_weight_shape()}, got {tuple(weight.shape)}')
        if bias is not None and not self._has_bias():
            raise ConfigError(f'{who}: got a bias but the layer has none (bias=False)')
        ref = self.convs[0].weight
        if self.strategy == 'cl':
            kernels = list(factorize_cl(weight.to(ref.dtype), self.groups, self.ratio,
                                        generator=generator))
        else:
            sizes = [tuple(c.kernel_size) for c in self.convs]
            channels = [self.in_channels] + [c.out_channels for c in self.convs]
            need = self.exact_min_ratio()
            if self.ratio < need:
                raise ConfigError(
                    f"{who}: keep_weights with strategy='ck' on a "
                    f'{self.kernel_size[0]}x{self.kernel_size[1]} kernel needs '
                    f'ratio >= {need} for an exact factorisation, got ratio='
                    f"{self.ratio}; use strategy='cl' (exact for any ratio) or a "
                    f'larger ratio')
            kernels = factorize_ck(weight.to(ref.dtype), self.groups, channels, sizes,
                                   init=[c.weight for c in self.convs])
        with torch.no_grad():
            for conv, kernel in zip(self.convs, kernels):
                conv.weight.copy_(kernel)
                if conv.bias is not None:
                    conv.bias.zero_()
            if bias is not None:
                self.convs[-1].bias.copy_(bias)
        self.remember_compact_reference(weight)

    def exact_min_ratio(self) -> int:
        """Smallest ratio at which :meth:`set_compact` is exact: 1 for CL, more for CK."""
        if self.strategy == 'cl':
            return 1
        return ck_exact_min_ratio(self.in_channels // self.groups,
                                  self.out_channels // self.groups,
                                  [tuple(c.kernel_size) for c in self.convs])

    def extra_repr(self) -> str:
        """Compact hyper-parameters plus strategy, ratio, mode and compact shape."""
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}')
        if self.padding != (0, 0):
            s += f', padding={self.padding!r}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if not self._has_bias():
            s += ', bias=False'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode}'
        s += (f', strategy={self.strategy}, ratio={self.ratio}, mode={self._mode}, '
              f'compact={self.compact_weight_shape()}')
        if self.name:
            s += f', name={self.name!r}'
        return s


def _has_channels_last_strides(tensor: Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last, as a conv reads its weight.

    ``is_contiguous(memory_format=...)`` cannot tell for a ``[C, 1, k, k]`` or
    ``[O, I, 1, 1]`` tensor (both tests pass), but a conv still follows the
    actual strides, so they are compared here.
    """
    return (tensor.stride() == _layout_strides(tensor.shape, True)
            and tensor.stride() != _layout_strides(tensor.shape, False))


def _layout_strides(shape: Sequence[int], channels_last: bool) -> tuple[int, ...]:
    """Strides of a dense 4-D tensor of ``shape``, channels-last or contiguous."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
