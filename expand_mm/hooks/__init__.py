"""MMEngine hooks of expand_mm (registered in the root ``HOOKS`` registry)."""
from .channel_planting import ChannelPlantingHook
from .channel_planting_search import ChannelPlantingSearchHook
from .contract_checkpoint import ContractCheckpointHook
from .load_checkpoint import ExpandCheckpointLoadHook
from .nonlinear_init import NONLINEAR_INIT_META_KEY, NonlinearInitHook
from .setup_checks import ExpandNetCheckHook

__all__ = ['ChannelPlantingHook', 'ChannelPlantingSearchHook', 'ContractCheckpointHook',
           'ExpandCheckpointLoadHook',
           'ExpandNetCheckHook', 'NonlinearInitHook', 'NONLINEAR_INIT_META_KEY']
