# ExpandNet-CL (r=4) of the compact U-Net (16 base channels) + FCN head on
# Cityscapes: the paper's segmentation setting.
#
# Every 3x3 conv of the encoder, the decoder and the heads is trained as a
# 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online mode); the 1x1
# convs (upsampling InterpConvs, classifiers) stay compact.
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py'

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
