"""Why ExpandNets train better: gradient confusion and loss landscapes.

Generic functions over any ``nn.Module``, an iterable of batches and a loss
function ``loss_fn(model, batch) -> scalar tensor``, with thin adapters for
MMEngine models and configs. ``tools/analysis/`` runs them on configs.
"""
from .gradient_confusion import (GradientConfusionResult, build_mm_model_and_loader,
                                 compact_form, flat_gradient, gradient_confusion, mm_loss_fn,
                                 mm_preprocess)
from .loss_landscape import (LandscapeResult, filter_normalized_direction, loss_landscape_1d,
                             loss_landscape_2d)

__all__ = [
    'gradient_confusion', 'GradientConfusionResult', 'flat_gradient', 'compact_form',
    'loss_landscape_1d', 'loss_landscape_2d', 'LandscapeResult',
    'filter_normalized_direction', 'mm_loss_fn', 'mm_preprocess', 'build_mm_model_and_loader',
]
