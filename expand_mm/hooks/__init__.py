"""MMEngine hooks of expand_mm (registered in the root ``HOOKS`` registry)."""
from .channel_planting import ChannelPlantingHook
from .channel_planting_search import ChannelPlantingSearchHook
from .contract_checkpoint import ContractCheckpointHook
from .factor_lr_calibration import FactorLRCalibrationHook
from .gradient_confusion import GradientConfusionHook
from .load_checkpoint import ExpandCheckpointLoadHook
from .rng_state import RNGStateHook
from .safe_checkpoint import SafeCheckpointHook
from .nonlinear_init import NONLINEAR_INIT_META_KEY, NonlinearInitHook
from .setup_checks import ExpandNetCheckHook
from .weight_decay_term import WeightDecayTermHook

__all__ = ['ChannelPlantingHook', 'ChannelPlantingSearchHook', 'ContractCheckpointHook',
           'ExpandCheckpointLoadHook', 'ExpandNetCheckHook', 'FactorLRCalibrationHook',
           'GradientConfusionHook', 'NonlinearInitHook', 'NONLINEAR_INIT_META_KEY', 'RNGStateHook',
           'SafeCheckpointHook', 'WeightDecayTermHook']
