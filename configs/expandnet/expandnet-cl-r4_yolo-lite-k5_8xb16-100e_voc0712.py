# ExpandNet-CL (r=4) of YOLO-LITE with 5x5 backbone kernels on PASCAL VOC 07+12.
#
# The CL counterpart of expandnet-ck-r4_yolo-lite-k5_8xb16-100e_voc0712.py on
# the same compact model: every k x k conv (5x5 in the backbone, 3x3 in the
# neck and head) becomes 1x1 -> k x k -> 1x1 with 4x the channels inside.
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../yolo_lite/yolo-lite-k5_8xb16-100e_voc0712.py'

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
