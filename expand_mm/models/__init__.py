"""OpenMMLab glue: the ``ExpandNet`` model builder and small compact models."""
from .expandnet import build_expandnet, compact_model_cfg, deployable_model, expansion_report

__all__ = ['build_expandnet', 'compact_model_cfg', 'deployable_model', 'expansion_report']
from . import backbones  # noqa: F401
