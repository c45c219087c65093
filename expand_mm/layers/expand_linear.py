"""ExpandLinear: a compact ``nn.Linear`` trained as a chain of three linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import compose_linear_chain, factorize_linear, propagate_linear_bias
from .base import ExpandedLayer


class ExpandLinear(ExpandedLayer):
    """An ``m -> n`` linear layer expanded into ``m -> r*m -> r*n -> n``.

    The three sub-layers are plain ``nn.Linear`` in :attr:`linears` (state-dict
    keys ``linears.0.weight``, ...), freshly initialised as standalone linears of
    their shape; they have biases iff the compact layer has one, and the
    contracted bias is the propagated sum. :attr:`weight` / :attr:`bias` return
    the composed compact weight and bias.

    Args:
        in_features: ``m``.
        out_features: ``n``.
        bias: Whether the compact layer (and so every sub-layer) has a bias.
        ratio: Expansion ratio ``r >= 1``.
        mode: ``'online'`` or ``'explicit'``.
        name: Module path, used in error messages.
        device: Device of the sub-layers.
        dtype: Dtype of the sub-layers.

    Raises:
        ConfigError: On a bad ratio or mode.
    """

    strategy = 'fc'

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 ratio: int = 4, mode: str = 'online', name: str | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(ratio=ratio, mode=mode, name=name)
        self.in_features = in_features
        self.out_features = out_features
        widths = [in_features, ratio * in_features, ratio * out_features, out_features]
        self.linears = nn.ModuleList(
            nn.Linear(widths[i], widths[i + 1], bias=bias, device=device, dtype=dtype)
            for i in range(3))

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio: int = 4, mode: str = 'online',
                    keep_weights: bool = False, name: str | None = None,
                    generator: torch.Generator | None = None) -> 'ExpandLinear':
        """Expand a compact linear layer.

        Args:
            linear: The compact ``nn.Linear`` (not modified).
            ratio: Expansion ratio ``r``.
            mode: ``'online'`` or ``'explicit'``.
            keep_weights: Factorise ``linear``'s weights exactly (see
                :meth:`set_compact`) instead of a fresh init.
            name: Module path, used in error messages.
            generator: Optional RNG for the orthonormal factors.

        Returns:
            The expanded layer on ``linear``'s device and dtype, in its
            train/eval state.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f'{name or "from_linear"}: expected an nn.Linear, '
                            f'got {type(linear).__name__}')
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    ratio=ratio, mode=mode, name=name, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        layer.remember_compact_reference(linear.weight)
        if keep_weights:
            layer.set_compact(linear.weight, linear.bias, generator=generator)
        return layer.train(linear.training)

    @property
    def sublayers(self) -> nn.ModuleList:
        """The sub-layers, first applied first (same as :attr:`linears`)."""
        return self.linears

    def compact_weight_shape(self) -> tuple[int, int]:
        """``(n, m)``."""
        return (self.out_features, self.in_features)

    def _compose(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
        weights = [l.weight if dtype is None else l.weight.to(dtype) for l in self.linears]
        biases = [None if l.bias is None else
                  (l.bias if dtype is None else l.bias.to(dtype)) for l in self.linears]
        return compose_linear_chain(weights), propagate_linear_bias(weights, biases)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` of shape ``(*, m)``."""
        if self._mode == 'explicit':
            for i, linear in enumerate(self.linears):
                if i and self.nonlinearity is not None:
                    x = self.nonlinearity(x)
                x = linear(x)
            return x
        weight, bias = self.composed()
        return F.linear(x, weight, bias)

    def contract(self) -> nn.Linear:
        """Return the compact ``nn.Linear`` computing the same function.

        Composed in float64 and cast back; same device, dtype and train/eval
        state as the sub-layers.
        """
        self._check_linear('contract()')
        ref = self.linears[0].weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self._has_bias(),
                           device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            weight, bias = self._compose(torch.float64)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.train(self.training)

    def set_compact(self, weight: Tensor, bias: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Set the factors so the chain computes exactly the given compact layer.

        The first factor has orthonormal columns, the last orthonormal rows, the
        middle is ``C^T W A^T``; intermediate biases become 0, the last ``bias``.

        Args:
            weight: ``(n, m)``.
            bias: ``(n,)`` or ``None``.
            generator: Optional RNG for the orthonormal factors.

        Raises:
            ConfigError: On a shape mismatch or a bias for a bias-free layer.
        """
        who = self._describe()
        if tuple(weight.shape) != self.compact_weight_shape():
            raise ConfigError(f'{who}: compact weight must have shape '
                              f'{self.compact_weight_shape()}, got {tuple(weight.shape)}')
        if bias is not None and not self._has_bias():
            raise ConfigError(f'{who}: got a bias but the layer has none (bias=False)')
        factors = factorize_linear(weight.to(self.linears[0].weight.dtype), self.ratio,
                                   generator=generator)
        with torch.no_grad():
            for linear, factor in zip(self.linears, factors):
                linear.weight.copy_(factor)
                if linear.bias is not None:
                    linear.bias.zero_()
            if bias is not None:
                self.linears[-1].bias.copy_(bias)
        self.remember_compact_reference(weight)

    def extra_repr(self) -> str:
        """Compact shape plus ratio and mode."""
        s = (f'in_features={self.in_features}, out_features={self.out_features}, '
             f'bias={self._has_bias()}, strategy={self.strategy}, ratio={self.ratio}, '
             f'mode={self._mode}')
        if self.name:
            s += f', name={self.name!r}'
        return s
