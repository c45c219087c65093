# ExpandNet-CL (r=4) of the compact U-Net + FCN head on the 64x64 digits.
#
# Every 3x3 conv of the encoder, the decoder and the heads is trained as a
# 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online mode; the
# strided stem conv keeps its stride on the 3x3); the 1x1 convs (upsampling
# InterpConvs, classifiers) stay compact. The deployed model is the compact
# U-Net of the base config, trained on the same data with the same schedule.
_base_ = './unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'

# projects.digits.data_hint (imported from the repository root) makes a missing
# data_root come with the command that writes the data.
custom_imports = dict(imports=['expand_mm', 'projects.digits.data_hint'],
                      allow_failed_imports=False)

# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')
# The factors' base rate is the default's ceiling, 1.5e-3 (x0.094 of this
# schedule's AdamW 0.016): seed 0, 800 iterations, mIoU 21.3 / 33.4 / 52.5 at
# multipliers 0.5 / 0.25 / 0.1 against 44.3 for the compact U-Net
# (projects/digits/README.md, "Calibration"; docs/studies.md for three seeds).
optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
# The full-resolution decoder stage feeds no head, so some parameters get no
# gradient: static_graph=True (not with gradient accumulation).
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
