# Knowledge distillation into the compact digits U-Net itself (no expansion):
# the reference for the ExpandNet student of
# ./kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
# (same teacher, same loss, same schedule).
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py
# then:
#   python tools/train.py projects/digits/configs/distill/kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
# iter_800_compact.pth (the student alone) loads strictly into
# ../digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py.
_base_ = '../digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'

# projects.digits.data_hint (imported from the repository root) makes a missing
# data_root come with the command that writes the data.
custom_imports = dict(imports=['expand_mm', 'projects.digits.data_hint'],
                      allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='Distiller',
    student={{_base_.model}},  # the stock compact U-Net
    teacher='{{fileDirname}}/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py',
    teacher_ckpt='work_dirs/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64/iter_800.pth',
    distill_losses=[
        # Hinton's KD on the decode head's logits: pixel-wise KL of the
        # temperature-softened class distributions, x T^2.
        dict(
            type='LogitsKDLoss',
            student='decode_head',
            activation='softmax',
            temperature=4.0,
            resize=True,
            loss_weight=1.0,
            loss_name='loss_kd'),
    ])

# Write iter_N_compact.pth beside every checkpoint: the student alone (the
# teacher is training-only); let load_from= take a stock compact checkpoint.
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
