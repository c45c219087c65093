# Compact YOLO-LITE-style detector on the 64x64 digits detection set.
#
# The model of configs/yolo_lite/yolo-lite_8xb16-100e_voc0712.py -- the YOLOLite
# backbone (six conv-BN-LeakyReLU layers, 2x2 max-pools in between) under
# mmdet's thin three-scale YOLOv3 neck and head -- written out here because
# that config also carries VOC data and a schedule, which MMEngine cannot merge
# with the digits data base (a key may come from one base only).
#
# Sized to train in a few CPU minutes (projects/digits/tools/demo.py;
# calibration in projects/digits/README.md): 64x64 canvases with 16-32 px
# digits (the data base's 128x128 canvases with 16-48 px digits, resized to
# 64x64, learnt far slower: mAP 13 after 1,500 iterations), the two deepest
# widths halved (16-32-64-64-128-128 instead of 16-32-64-128-128-256: the
# kernel composition that an online ExpandNet pays per step grows with the
# cube of the width), 10 classes, anchors clustered on the digit boxes, and a
# short AdamW schedule.
_base_ = [
    '../_base_/datasets/digits_det.py',
    'mmdet::_base_/default_runtime.py',
]

# projects.digits.data_hint (imported from the repository root) makes a missing
# data_root come with the command that writes the data.
custom_imports = dict(imports=['expand_mm', 'projects.digits.data_hint'],
                      allow_failed_imports=False)

# Written by: python projects/digits/tools/make_digits_data.py --out data/digits64 --img-size 64
#             --min-scale 16 --max-scale 32 --max-digits 4
# (projects/digits/tools/demo.py generates it when missing).
data_root = 'data/digits64/digits_det/'
img_scale = (64, 64)

data_preprocessor = dict(
    type='DetDataPreprocessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=32)
model = dict(
    type='YOLOV3',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='YOLOLite',
        widths=(16, 32, 64, 64, 128, 128),
        kernel_size=3,
        out_indices=(3, 4, 5),  # strides 8, 16, 32
        norm_cfg=dict(type='BN'),
        act_cfg=dict(type='LeakyReLU', negative_slope=0.1)),
    neck=dict(
        type='YOLOV3Neck',
        num_scales=3,
        in_channels=[128, 128, 64],  # deepest first
        out_channels=[64, 32, 32]),
    bbox_head=dict(
        type='YOLOV3Head',
        num_classes=10,
        in_channels=[64, 32, 32],
        out_channels=[128, 64, 64],
        # k-means (k=9) of the training boxes' (w, h), largest on stride 32.
        anchor_generator=dict(
            type='YOLOAnchorGenerator',
            base_sizes=[[(16, 30), (19, 27), (20, 32)],
                        [(16, 22), (16, 25), (23, 30)],
                        [(10, 18), (13, 19), (13, 24)]],
            strides=[32, 16, 8]),
        bbox_coder=dict(type='YOLOBBoxCoder'),
        featmap_strides=[32, 16, 8],
        loss_cls=dict(
            type='CrossEntropyLoss',
            use_sigmoid=True,
            loss_weight=1.0,
            reduction='sum'),
        loss_conf=dict(
            type='CrossEntropyLoss',
            use_sigmoid=True,
            loss_weight=1.0,
            reduction='sum'),
        loss_xy=dict(
            type='CrossEntropyLoss',
            use_sigmoid=True,
            loss_weight=2.0,
            reduction='sum'),
        loss_wh=dict(type='MSELoss', loss_weight=2.0, reduction='sum')),
    train_cfg=dict(
        assigner=dict(
            type='GridAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5,
            min_pos_iou=0)),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        conf_thr=0.005,
        nms=dict(type='nms', iou_threshold=0.45),
        max_per_img=100))

# The base's pipelines with the 64x64 input (Resize pins the size; a no-op on
# this data). The test pipeline loads the boxes after Resize, so evaluation
# is on the original boxes.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
# Iteration-based training: an endless sampler (all canvases are square, so
# the base's AspectRatioBatchSampler has nothing to group). One loader worker
# keeps up with the small PNGs without taking the training's core.
train_dataloader = dict(
    batch_size=16,
    num_workers=1,
    sampler=dict(_delete_=True, type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        pipeline=train_pipeline,
        filter_cfg=dict(filter_empty_gt=True, min_size=8)))
val_dataloader = dict(
    num_workers=1, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
# The base resolved ann_file from its own data_root.
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# AdamW (insensitive to the scale of YOLOv3's sum-reduced losses), a short
# linear warm-up, cosine decay; validation once, at the end.
max_iters = 900
warmup_iters = 50
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.004, weight_decay=0.01),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    # eta_min_ratio, not an absolute eta_min: it ends every param group at the
    # same fraction of its own rate (0.004 x 2.5e-3 = 1e-5 here), so an
    # ExpandNet's per-factor learning rates keep their ratios to the end.
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min_ratio=2.5e-3,
         by_epoch=False, begin=warmup_iters, end=max_iters)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
# base_batch_size = (1 device) x (16 samples per device)
auto_scale_lr = dict(base_batch_size=16)
