# Knowledge distillation into an ExpandNet: the ExpandNet-CL (r=4) of the
# compact digits U-Net (16 base channels) learns from the labels and from the
# softened pixel-wise class distributions of a trained U-Net of twice its width.
#
# Train the teacher first (from the repository root):
#   python tools/train.py configs/distill/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py
# then this config:
#   python tools/train.py configs/distill/kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
# Every saved checkpoint gets a *_compact.pth twin (the student alone,
# contracted) for the compact config
# configs/digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py.
_base_ = '../digits/expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'

model = dict(
    _delete_=True,
    type='Distiller',
    student={{_base_.model}},  # the ExpandNet of the compact U-Net
    teacher='{{fileDirname}}/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py',
    teacher_ckpt='work_dirs/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64/iter_800.pth',
    distill_losses=[
        # Hinton's KD on the decode head's logits: pixel-wise KL of the
        # temperature-softened class distributions, x T^2; the teacher's maps
        # are resized to the student's if they differ.
        dict(
            type='LogitsKDLoss',
            student='decode_head',
            activation='softmax',
            temperature=4.0,
            resize=True,
            loss_weight=1.0,
            loss_name='loss_kd'),
    ])
