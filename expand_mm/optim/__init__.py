"""Optimizer glue of expand_mm (registered in MMEngine's root registries)."""
from .factor_lr import ExpandNetOptimWrapperConstructor, factor_lr_multipliers

__all__ = ['ExpandNetOptimWrapperConstructor', 'factor_lr_multipliers']
