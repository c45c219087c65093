# ExpandNet-CL (r=4) of SSDLite-MobileNetV2 (from scratch) on COCO at 320x320.
#
# SSDLite has only 3x3 (mostly depthwise) and 1x1 convs, so CL is the only
# expansion: each 3x3 becomes a 1x1 -> 3x3 -> 1x1 chain with 4x the channels
# per group inside; the 1x1s stay compact (expand_1x1=False, as in the paper).
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'

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
