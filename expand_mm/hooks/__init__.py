"""MMEngine hooks of expand_mm (registered in the root ``HOOKS`` registry)."""
from .channel_planting import ChannelPlantingHook
from .checkpoint_hooks import ContractCheckpointHook, ExpandCheckpointLoadHook
from .nonlinear_init import NONLINEAR_INIT_META_KEY, NonlinearInitHook

__all__ = ['ChannelPlantingHook', 'ContractCheckpointHook', 'ExpandCheckpointLoadHook',
           'NonlinearInitHook', 'NONLINEAR_INIT_META_KEY']
