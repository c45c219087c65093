# ExpandNet-CL (r=4) of the YOLO-LITE-style detector on PASCAL VOC 07+12 at 224x224.
#
# Every 3x3 conv of the YOLOLite backbone and of the YOLOv3 neck and head is
# trained as a 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online
# mode); the deployed model is the compact YOLO-LITE of the base config.
_base_ = '../yolo_lite/yolo-lite_8xb16-100e_voc0712.py'

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

# Load compact checkpoints (e.g. load_from=a compact model) into the factors;
# write a stock compact checkpoint (*_compact.pth) beside every saved one.
custom_hooks = [dict(type='ExpandCheckpointLoadHook'), dict(type='ContractCheckpointHook')]

# Multi-GPU (DDP) training: MMEngine runs the wrapper's train step, not the
# model's; this wrapper keeps the ExpandNet's deferred factor gradients there
# (same gradients, lower peak memory). Ignored on one device.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
