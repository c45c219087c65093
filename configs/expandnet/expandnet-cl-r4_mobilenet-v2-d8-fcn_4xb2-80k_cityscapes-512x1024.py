# ExpandNet-CL (r=4) of FCN on a dilated MobileNetV2 (output stride 8) on Cityscapes.
#
# Every 3x3 conv (the depthwise, dilated ones of the backbone and the FCN head
# convs) is trained as a 1x1 -> 3x3 -> 1x1 chain with 4x the channels (per
# group) inside. The ImageNet-pretrained backbone (model.pretrained) keeps its
# weights exactly (factorised); the heads are initialised fresh.
# Note: the stock FCN head (3x3 convs 320->512, 512->512 and the 832->512
# concat conv) holds most of the expansion: 9.7M -> 136.8M parameters in all.
# Add exclude=['decode_head.*'] to the model below to expand only the
# backbone and the auxiliary head.
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../mobilenet_v2/mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py'

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
