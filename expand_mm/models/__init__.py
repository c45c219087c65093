"""OpenMMLab glue: the ``ExpandNet`` model builder, training-time wrappers, compact models."""
from .aux_hierarchy import AuxHierarchy, AuxStructureHook
from .aux_overparam import AuxOverParam, widen_head_cfg
from .distiller import Distiller, DistillLoss, FeatureImitationLoss, LogitsKDLoss
from .distributed import ExpandNetDistributedDataParallel
from .deployable import (compact_model_cfg, deferring_expandnet, deployable_model,
                         deployable_model_cfg, find_deployable, unwrap_model)
from .expandnet import build_expandnet, expansion_report
from .wrappers import TrainingWrapper, record_forward

__all__ = ['build_expandnet', 'compact_model_cfg', 'deferring_expandnet', 'deployable_model',
           'expansion_report', 'ExpandNetDistributedDataParallel',
           'TrainingWrapper', 'deployable_model_cfg', 'find_deployable', 'unwrap_model',
           'record_forward', 'Distiller',
           'DistillLoss', 'LogitsKDLoss', 'FeatureImitationLoss', 'AuxOverParam',
           'widen_head_cfg', 'AuxHierarchy', 'AuxStructureHook']
from . import backbones  # noqa: F401
