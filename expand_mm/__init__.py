"""expand_mm: ExpandNets for OpenMMLab detectors and segmenters.

Train a compact model with every selected conv / linear layer expanded into a
chain of linear layers, then multiply the chains back into a stock compact
checkpoint. Importing the package registers ``type='ExpandNet'`` in MMEngine's
``MODELS``, the checkpoint hooks in ``HOOKS``, and lets ``torch.load`` read
MMEngine's own checkpoints on torch >= 2.6.
"""
from .compat import (allow_mmengine_checkpoints, make_checkpoint_loading_safe,
                     patch_mmdet_ssd_head, refuse_amp_without_accelerator)
from .errors import ConfigError, ExpandMMError, UsageError
from .layers import ExpandConv2d, ExpandedLayer, ExpandLinear, deferred_factor_grads
from .surgery import (ExpansionReport, ExpansionSettings, contract_model, expand_model,
                      expanded_layers, set_expand_mode)
from .verification import (ContractionCheckError, check_contraction, check_layer_contractions,
                           contraction_errors, non_finite_tensors, verify_contraction)

allow_mmengine_checkpoints()
make_checkpoint_loading_safe()
patch_mmdet_ssd_head()
refuse_amp_without_accelerator()

from . import models  # noqa: E402  (registers ExpandNet and the compact models)
from . import hooks  # noqa: E402  (registers the checkpoint hooks)
from . import optim  # noqa: E402  (registers ExpandNetOptimWrapperConstructor)
from .checkpoint import CheckpointError, match_state_dict, read_checkpoint  # noqa: E402
from .models import (AuxHierarchy, AuxOverParam, Distiller,  # noqa: E402
                     FeatureImitationLoss, LogitsKDLoss,
                     TrainingWrapper, deployable_model, find_deployable)
from .optim import (ExpandNetOptimWrapperConstructor, PolyLRRatio,  # noqa: E402
                    ProductWeightDecay, factor_lr_multipliers)
from .deploy import deployable_state_dict  # noqa: E402
from .planting import ChannelPlanter, PlantingError  # noqa: E402
from .hooks import (ChannelPlantingHook, ChannelPlantingSearchHook,  # noqa: E402
                    ExpandNetCheckHook, GradientConfusionHook, NonlinearInitHook, RNGStateHook,
                    SafeCheckpointHook, WeightDecayTermHook)
from .planting import GrowingPlanter, PlantedSubnet, PlantingSearch  # noqa: E402
from . import analysis  # noqa: E402
from .apis import init_compact_model  # noqa: E402
from .analysis import (GradientConfusionResult, LandscapeResult, gradient_confusion,  # noqa: E402
                       loss_landscape_1d, loss_landscape_2d)

__version__ = '0.1.0'

__all__ = [
    'ExpandMMError', 'ConfigError', 'UsageError',
    'ExpandConv2d', 'ExpandLinear', 'ExpandedLayer', 'ExpansionReport', 'ExpansionSettings',
    'expand_model', 'ContractionCheckError', 'contraction_errors', 'non_finite_tensors',
    'contract_model', 'check_contraction', 'check_layer_contractions', 'verify_contraction',
    'expanded_layers', 'set_expand_mode',
    'deferred_factor_grads',
    'deployable_model', 'CheckpointError', 'read_checkpoint', 'match_state_dict',
    'allow_mmengine_checkpoints', 'hooks', 'models', 'optim',
    'ExpandNetOptimWrapperConstructor', 'factor_lr_multipliers',
    'TrainingWrapper', 'Distiller', 'LogitsKDLoss', 'FeatureImitationLoss', 'AuxOverParam', 'AuxHierarchy',
    'find_deployable', 'deployable_state_dict',
    'ChannelPlanter', 'ChannelPlantingHook', 'PlantingError', 'NonlinearInitHook',
    'ExpandNetCheckHook', 'RNGStateHook', 'SafeCheckpointHook',
    'ChannelPlantingSearchHook', 'GrowingPlanter', 'PlantingSearch', 'PlantedSubnet',
    'ProductWeightDecay', 'PolyLRRatio',
    'init_compact_model',
    'analysis', 'gradient_confusion', 'GradientConfusionResult', 'loss_landscape_1d',
    'loss_landscape_2d', 'LandscapeResult',
]
__all__ += ['GradientConfusionHook', 'WeightDecayTermHook']
