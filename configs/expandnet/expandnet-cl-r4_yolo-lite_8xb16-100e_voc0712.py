# ExpandNet-CL (r=4) of the YOLO-LITE-style detector on PASCAL VOC 07+12 at 224x224.
#
# Every 3x3 conv of the YOLOLite backbone and of the YOLOv3 neck and head is
# trained as a 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online
# mode); the deployed model is the compact YOLO-LITE of the base config.
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../yolo_lite/yolo-lite_8xb16-100e_voc0712.py'

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

model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
