"""MMEngine hooks of expand_mm (registered in the root ``HOOKS`` registry)."""
from .channel_planting import ChannelPlantingHook
from .contract_checkpoint import ContractCheckpointHook
from .factor_lr_calibration import FactorLRCalibrationHook
from .load_checkpoint import ExpandCheckpointLoadHook
from .nonlinear_init import NONLINEAR_INIT_META_KEY, NonlinearInitHook
from .setup_checks import ExpandNetCheckHook

__all__ = ['ChannelPlantingHook', 'ContractCheckpointHook', 'ExpandCheckpointLoadHook',
           'ExpandNetCheckHook', 'FactorLRCalibrationHook', 'NonlinearInitHook', 'NONLINEAR_INIT_META_KEY']
