# ExpandNet-CL (r=4) of YOLOv3-MobileNetV2 on PASCAL VOC 07+12 at 320x320.
#
# Trains the 3x3 convs (depthwise ones included) of the backbone, neck and head
# as 1x1 -> 3x3 -> 1x1 chains with 4x the channels inside, composed into one
# kernel per forward (online mode). The ImageNet-pretrained backbone keeps its
# weights exactly (factorised); the rest is initialised fresh.
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../yolov3/yolov3_mobilenetv2_8xb24-320-300e_voc0712.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')

optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')

# expand_mm's hooks under default_hooks keys of their own: that dict merges into the
# base's, so the base's hooks (custom_hooks included) all stay.
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))

# static_graph=True: some parameters get no gradient (the backbone's last 1x1 conv
# runs but feeds no output). Not with gradient accumulation: torch's DDP refuses
# no_sync() in the first step of a static graph.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
