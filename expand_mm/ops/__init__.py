"""Pure tensor maths of expansion: compose chains, propagate biases, factorise."""

from .bias import conv_bias_through, propagate_conv_bias, propagate_linear_bias
from .compose import (ChainTree, chain_order, compose_conv_chain, compose_conv_kernels,
                      compose_linear_chain)
from .factorize import (ck_exact_min_ratio, factorize_cl, factorize_ck, factorize_linear,
                        orthogonal_like, random_orthonormal)
from .plan import (ck_anchors, ck_channels, ck_depth, ck_kernel_sizes, cl_channels,
                   cl_kernel_sizes, padding_amounts, to_pair)

__all__ = [
    'ChainTree', 'chain_order', 'ck_anchors', 'ck_channels', 'ck_depth',
    'ck_exact_min_ratio', 'ck_kernel_sizes', 'cl_channels', 'cl_kernel_sizes',
    'compose_conv_chain', 'compose_conv_kernels', 'compose_linear_chain',
    'conv_bias_through', 'factorize_ck', 'factorize_cl', 'factorize_linear',
    'orthogonal_like', 'padding_amounts', 'propagate_conv_bias', 'propagate_linear_bias',
    'random_orthonormal', 'to_pair'
]
