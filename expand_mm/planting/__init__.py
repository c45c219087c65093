"""Channel planting: the planter (grow channels, old weights frozen), the search that chooses
where to grow, the export of the narrower network it found, and the baking of a
mid-planting checkpoint into the stock network of its stage."""
from .bake import (PlantingBakeError, bake_planting_masks, planting_stage,
                   refuse_unfinished_planting, unfinished_planting)
from .export import (PlantedSubnet, apply_channel_shapes, narrow_subnet, subnet_channels,
                     subnet_model_cfg)
from .growing import GrowingPlanter
from .planter import (FREEZE_MODES, MASK_HOOK_MARK, ChannelPlanter, PlantedUnit, PlantingError,
                      bake_masks, channel_mask, masked_units, remove_mask_hooks, stage_label,
                      stage_widths)
from .search import (Candidate, CandidateScore, PlantingSearch, SearchBudget, SearchData,
                     make_candidates, rank_candidates, score_candidate)

__all__ = ['ChannelPlanter', 'PlantedUnit', 'PlantingError', 'PlantingBakeError', 'FREEZE_MODES',
           'MASK_HOOK_MARK', 'bake_masks', 'channel_mask', 'masked_units', 'remove_mask_hooks',
           'stage_label', 'stage_widths', 'bake_planting_masks', 'planting_stage',
           'refuse_unfinished_planting', 'unfinished_planting', 'GrowingPlanter',
           'PlantingSearch', 'SearchBudget', 'SearchData', 'Candidate', 'CandidateScore',
           'make_candidates', 'rank_candidates', 'score_candidate', 'PlantedSubnet',
           'apply_channel_shapes', 'narrow_subnet', 'subnet_channels', 'subnet_model_cfg']
