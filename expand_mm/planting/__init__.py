"""Channel planting: the planter (grow channels, old weights frozen) and the baking of
a mid-planting checkpoint into the stock network of its stage."""
from .bake import (PlantingBakeError, bake_planting_masks, planting_stage,
                   refuse_unfinished_planting, unfinished_planting)
from .planter import (FREEZE_MODES, MASK_HOOK_MARK, ChannelPlanter, PlantedUnit, PlantingError,
                      bake_masks, channel_mask, masked_units, remove_mask_hooks, stage_label,
                      stage_widths)

__all__ = ['ChannelPlanter', 'PlantedUnit', 'PlantingError', 'PlantingBakeError', 'FREEZE_MODES',
           'MASK_HOOK_MARK', 'bake_masks', 'channel_mask', 'masked_units', 'remove_mask_hooks',
           'stage_label', 'stage_widths', 'bake_planting_masks', 'planting_stage',
           'refuse_unfinished_planting', 'unfinished_planting']
