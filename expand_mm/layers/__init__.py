"""Expanded layers: train as a linear chain, contract to the compact layer."""

from .base import MODES, ExpandedLayer
from .deferral import deferred_factor_grads
from .deferred_grads import deferral_unsupported_reason, flush_deferred_factor_grads_first
from .expand_conv import ExpandConv2d
from .expand_linear import ExpandLinear

__all__ = ['MODES', 'ExpandedLayer', 'ExpandConv2d', 'ExpandLinear', 'deferred_factor_grads',
           'deferral_unsupported_reason', 'flush_deferred_factor_grads_first']
