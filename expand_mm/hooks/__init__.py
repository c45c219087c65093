"""MMEngine hooks of expand_mm (registered in the root ``HOOKS`` registry)."""
from .checkpoint_hooks import ContractCheckpointHook, ExpandCheckpointLoadHook

__all__ = ['ContractCheckpointHook', 'ExpandCheckpointLoadHook']
