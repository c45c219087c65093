# Knowledge distillation into an ExpandNet: the ExpandNet-CL (r=4) of the
# compact digits YOLO-LITE-style detector learns from the labels and from a
# trained detector of twice its width.
#
# Train the teacher first (from the repository root):
#   python tools/train.py configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# then this config:
#   python tools/train.py configs/distill/kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py
# Every saved checkpoint gets a *_compact.pth twin: the student alone,
# contracted, which loads strictly into and is evaluated with the compact config
#   python tools/test.py configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py \
#       work_dirs/kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64/iter_900_compact.pth
# (the teacher and the feature adapters are training-only).
_base_ = '../digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'

num_classes = 10
model = dict(
    _delete_=True,
    type='Distiller',
    student={{_base_.model}},  # the ExpandNet of the compact detector
    teacher='{{fileDirname}}/yolo-lite-w2_1xb16-900i_digits-det-64x64.py',
    teacher_ckpt='work_dirs/yolo-lite-w2_1xb16-900i_digits-det-64x64/iter_900.pth',
    distill_losses=[
        # Objectness and class logits of every anchor of the three YOLOv3
        # maps (channels 4..14 of each 5 + 10 group; not the box offsets):
        # Bernoulli KL against the teacher's probabilities, summed like
        # YOLOv3's own losses.
        dict(
            type='LogitsKDLoss',
            student='bbox_head',
            activation='sigmoid',
            temperature=1.0,
            group_size=5 + num_classes,
            channels=(4, 5 + num_classes),
            reduction='sum',
            loss_weight=1.0,
            loss_name='loss_kd'),
        # FitNets-style imitation of the teacher's neck outputs through
        # training-only 1x1 adapters (student 64/32/32 -> teacher 128/64/64).
        dict(
            type='FeatureImitationLoss',
            student='neck',
            student_channels=[64, 32, 32],
            teacher_channels=[128, 64, 64],
            loss_weight=1.0,
            loss_name='loss_feat'),
    ])
