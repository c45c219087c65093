"""Deprecated module path: the checkpoint hooks live in their own modules.

:class:`ContractCheckpointHook` in :mod:`expand_mm.hooks.contract_checkpoint`,
:class:`ExpandCheckpointLoadHook` in :mod:`expand_mm.hooks.load_checkpoint`,
the start-of-training checks in :mod:`expand_mm.checks`.
"""
from ..checks import check_constructor_for_paramwise_keys  # noqa: F401
from .contract_checkpoint import ContractCheckpointHook  # noqa: F401
from .load_checkpoint import ExpandCheckpointLoadHook  # noqa: F401
