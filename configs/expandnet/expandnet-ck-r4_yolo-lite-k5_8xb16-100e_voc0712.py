# ExpandNet-CK (r=4) of YOLO-LITE with 5x5 backbone kernels on PASCAL VOC 07+12.
#
# strategy='auto': every 5x5 backbone conv is trained as a chain of two 3x3
# convs (CK, 4x the channels in between); the 3x3 convs of the neck and head,
# where CK does not apply, get CL (1x1 -> 3x3 -> 1x1). With strategy='ck' a
# selected 3x3 would be an error, so pure CK would need include=['backbone.*'].
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../yolo_lite/yolo-lite-k5_8xb16-100e_voc0712.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='auto',
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
