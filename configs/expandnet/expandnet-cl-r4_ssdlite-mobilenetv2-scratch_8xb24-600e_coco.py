# ExpandNet-CL (r=4) of SSDLite-MobileNetV2 (from scratch) on COCO at 320x320.
#
# SSDLite has only 3x3 (mostly depthwise) and 1x1 convs, so CL is the only
# expansion: each 3x3 becomes a 1x1 -> 3x3 -> 1x1 chain with 4x the channels
# per group inside; the 1x1s stay compact (expand_1x1=False, as in the paper).
_base_ = '../ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

# The compact model of the base, built and then expanded in place: its k x k
# convs (k > 1) become linear chains that contract back into it exactly.
model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')

# Per-factor learning rates (ExpandNetOptimWrapperConstructor): for adaptive
# optimizers (Adam, AdamW, ...) each factor's rate is scaled so that the
# composed kernel moves like the compact one; SGD is left as it is ('auto').
optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')

# The base's hooks, plus: load compact checkpoints (e.g. load_from=a compact
# model) into the factors; write a stock compact checkpoint (*_compact.pth)
# beside every saved one.
custom_hooks = [
    dict(type='NumClassCheckHook'),
    dict(type='CheckInvalidLossHook', interval=50, priority='VERY_LOW'),
    dict(type='ExpandCheckpointLoadHook'),
    dict(type='ContractCheckpointHook'),
]

# Multi-GPU (DDP) training: MMEngine runs the wrapper's train step, not the
# model's; this wrapper keeps the ExpandNet's deferred factor gradients there
# (same gradients, lower peak memory). Ignored on one device.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
