# Teacher for distillation: the digits U-Net + FCN head at twice the width
# (32 base channels instead of 16); same classes and output resolution, so
# its decode-head logits have the student's shape. Train it first, from the
# repository root:
#   python tools/train.py projects/digits/configs/distill/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py
# which writes work_dirs/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64/iter_800.pth,
# the teacher_ckpt of ./kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py.
_base_ = '../digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'

base_channels = 32
model = dict(
    backbone=dict(base_channels=base_channels),
    decode_head=dict(in_channels=2 * base_channels, channels=2 * base_channels),
    auxiliary_head=dict(in_channels=4 * base_channels, channels=2 * base_channels))
