"""OpenMMLab glue: the ``ExpandNet`` model builder, training-time wrappers, compact models."""
from .aux_overparam import AuxOverParam, widen_head_cfg
from .distiller import Distiller, DistillLoss, FeatureImitationLoss, LogitsKDLoss
from .distributed import ExpandNetDistributedDataParallel
from .expandnet import (build_expandnet, compact_model_cfg, deferring_expandnet, deployable_model,
                        expansion_report)
from .wrappers import TrainingWrapper, deployable_model_cfg, record_forward

__all__ = ['build_expandnet', 'compact_model_cfg', 'deferring_expandnet', 'deployable_model',
           'expansion_report', 'ExpandNetDistributedDataParallel',
           'TrainingWrapper', 'deployable_model_cfg', 'record_forward', 'Distiller',
           'DistillLoss', 'LogitsKDLoss', 'FeatureImitationLoss', 'AuxOverParam',
           'widen_head_cfg']
from . import backbones  # noqa: F401
