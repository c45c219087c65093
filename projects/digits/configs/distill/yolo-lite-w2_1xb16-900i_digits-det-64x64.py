# Teacher for distillation: the digits YOLO-LITE-style detector at twice the
# width (backbone 32-64-128-128-256-256, neck and head bridges doubled).
#
# Same classes, anchors and strides as the compact detector, so its YOLOv3
# head outputs have the student's shapes (logits KD) and its neck outputs
# differ only in channels (feature imitation through 1x1 adapters). Train it
# first, from the repository root:
#   python tools/train.py projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# which writes work_dirs/yolo-lite-w2_1xb16-900i_digits-det-64x64/iter_900.pth,
# the teacher_ckpt of ./kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py.
_base_ = '../digits/yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(
    backbone=dict(widths=(32, 64, 128, 128, 256, 256)),
    neck=dict(in_channels=[256, 256, 128], out_channels=[128, 64, 64]),
    bbox_head=dict(in_channels=[128, 64, 64], out_channels=[256, 128, 128]))
