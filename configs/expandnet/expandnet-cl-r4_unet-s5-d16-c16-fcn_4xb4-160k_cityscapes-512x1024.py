# ExpandNet-CL (r=4) of the compact U-Net (16 base channels) + FCN head on
# Cityscapes: the paper's segmentation setting.
#
# Every 3x3 conv of the encoder, the decoder and the heads is trained as a
# 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online mode); the 1x1
# convs (upsampling InterpConvs, classifiers) stay compact.
_base_ = '../unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py'

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
