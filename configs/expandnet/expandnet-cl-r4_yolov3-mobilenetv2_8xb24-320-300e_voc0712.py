# ExpandNet-CL (r=4) of YOLOv3-MobileNetV2 on PASCAL VOC 07+12 at 320x320.
#
# Trains the 3x3 convs (depthwise ones included) of the backbone, neck and head
# as 1x1 -> 3x3 -> 1x1 chains with 4x the channels inside, composed into one
# kernel per forward (online mode). The ImageNet-pretrained backbone keeps its
# weights exactly (factorised); the rest is initialised fresh.
_base_ = '../yolov3/yolov3_mobilenetv2_8xb24-320-300e_voc0712.py'

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

# Multi-GPU (DDP) training: this wrapper keeps the ExpandNet's deferred factor
# gradients in the wrapper's train step (same gradients, lower peak memory).
# Some parameters get no gradient (the backbone's last 1x1
# conv runs but feeds no output); static_graph=True
# tells DDP so (find_unused_parameters=True cannot see the factors behind a
# deferred composition). Not with gradient accumulation: torch's DDP refuses
# no_sync() in the first step of a static graph. Ignored on one device.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
