"""Expanded layers: train as a linear chain, contract to the compact layer."""

from .base import MODES, ExpandedLayer
from .deferred_grads import deferred_factor_grads
from .expand_conv import ExpandConv2d
from .expand_linear import ExpandLinear

__all__ = ['MODES', 'ExpandedLayer', 'ExpandConv2d', 'ExpandLinear', 'deferred_factor_grads']
