# ExpandNet-CL (r=4) of SSDLite-MobileNetV2 (from scratch) on PASCAL VOC 07+12.
#
# SSDLite has only 3x3 (mostly depthwise) and 1x1 convs, so CL is the only
# expansion: each 3x3 becomes a 1x1 -> 3x3 -> 1x1 chain with 4x the channels
# per group inside; the 1x1s stay compact (expand_1x1=False, as in the paper).
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_voc0712.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')

optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')

# The base's hooks first, then expand_mm's.
custom_hooks = [
    dict(type='NumClassCheckHook'),
    dict(type='CheckInvalidLossHook', interval=50, priority='VERY_LOW'),
    dict(type='ExpandCheckpointLoadHook'),
    dict(type='ContractCheckpointHook'),
    dict(type='ExpandNetCheckHook'),
]

model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
