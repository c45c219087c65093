"""Optimizer glue of expand_mm (registered in MMEngine's root registries)."""
from .factor_lr import ExpandNetOptimWrapperConstructor, factor_lr_multipliers
from .product_decay import ProductWeightDecay
from .schedulers import PolyLRRatio

__all__ = ['ExpandNetOptimWrapperConstructor', 'factor_lr_multipliers', 'PolyLRRatio',
           'ProductWeightDecay']
