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
_base_ = '../mobilenet_v2/mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py'

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
