# Auxiliary over-parameterisation on top of an ExpandNet: the ExpandNet-CL
# (r=4) of the compact digits YOLO-LITE-style detector trains with a second,
# training-only YOLOv3 head of twice the bridge width (128-64-64 -> 256-128-128)
# fed by the same neck features; its losses (logged as aux_op.loss_*) reach
# the shared backbone and neck. Prediction, validation and the compact
# checkpoint use the compact detector only:
#   python tools/train.py projects/digits/configs/aux/aux-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py
#   python tools/test.py projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py \
#       work_dirs/aux-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64/iter_900_compact.pth
_base_ = '../digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(
    _delete_=True,
    type='AuxOverParam',
    model={{_base_.model}},  # the ExpandNet of the compact detector
    head='bbox_head',
    width_mult=2.0,  # the head's out_channels (bridge convs); in_channels stay the neck's
    aux_weight=1.0)
