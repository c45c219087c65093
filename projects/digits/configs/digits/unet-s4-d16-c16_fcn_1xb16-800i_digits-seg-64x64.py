# Compact U-Net (16 base channels, 4 stages, stride-2 stem) + FCN head on the
# 64x64 digits segmentation set.
#
# The model of configs/unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py
# (mmseg's UNet + FCN head, 16 instead of 64 base channels), resized to train
# in a few CPU minutes (projects/digits/tools/demo.py; the calibration runs
# are in projects/digits/README.md, "Calibration"):
# - 64x64 canvases with 16-32 px digits;
# - 4 stages, the first conv with stride 2 (mmseg's `strides` option): the
#   encoder runs at 1/2 .. 1/16 of the input, as the stock 5-stage U-Net's
#   deeper stages do, the deepest features see 133 px (more than a digit,
#   which telling digits apart needs), and a step costs a quarter of the
#   stride-1 U-Net's; the heads' logits (1/4, 1/8 resolution) are upsampled to the
#   input by mmseg, as for any head. The stock fifth stage (256 channels)
#   would hold 60% of the parameters and 85% of the kernel composition an
#   online ExpandNet pays per step;
# - no augmentation, and background weighted 0.1 in the loss: digit pixels are
#   11% of the image and, for the first ~1,000 iterations, a plain
#   cross-entropy model predicts background everywhere (mIoU 8, measured);
# - 11 classes (background + 0-9), plain BN (one device), whole-image
#   inference, a short AdamW schedule (800 iterations, lr 0.016).
_base_ = [
    'mmseg::_base_/models/fcn_unet_s5-d16.py',
    '../_base_/datasets/digits_seg.py',
    'mmseg::_base_/default_runtime.py',
]

# Written by: python projects/digits/tools/make_digits_data.py --out data/digits64 --img-size 64
#             --min-scale 16 --max-scale 32 --max-digits 4
# (projects/digits/tools/demo.py generates it when missing).
data_root = 'data/digits64/digits_seg/'
crop_size = (64, 64)

base_channels = 16
norm_cfg = dict(type='BN', requires_grad=True)
# mmseg 1.2.2's cross_entropy indexes class_weight with the label map to
# normalise a 'mean' loss, which fails on the ignored (255) edge pixels; with
# reduction='none' it returns the weighted per-pixel loss (0 where ignored)
# and MMEngine's parse_losses averages it.
class_weight = [0.1] + [1.0] * 10
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        base_channels=base_channels,
        num_stages=4,
        strides=(2, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg=norm_cfg),
    # The heads read the decoder at 1/4 (in_index=2: 2 * base_channels) and at
    # 1/8 (in_index=1: 4 * base_channels) of the input, hidden width
    # 2 * base_channels. Telling digits apart needs the deep features: a head
    # on the last, 1/2-resolution stage (16 channels, dominated by the stem's
    # skip connection) separated strokes from background within 300
    # iterations but stayed at "stroke of an unknown digit" (mIoU 8-12) for
    # 1,000-1,200 iterations at AdamW lr 0.002-0.008; on the 1/4 stage the
    # same model and schedule reached mIoU 49.6 (projects/digits/README.md,
    # "Calibration").
    decode_head=dict(
        in_channels=2 * base_channels,
        in_index=2,
        channels=2 * base_channels,
        num_classes=11,
        norm_cfg=norm_cfg,
        loss_decode=dict(
            type='CrossEntropyLoss',
            loss_weight=1.0,
            class_weight=class_weight,
            reduction='none')),
    auxiliary_head=dict(
        in_channels=4 * base_channels,
        in_index=1,
        channels=2 * base_channels,
        num_classes=11,
        norm_cfg=norm_cfg,
        loss_decode=dict(
            type='CrossEntropyLoss',
            loss_weight=0.4,
            class_weight=class_weight,
            reduction='none')),
    test_cfg=dict(mode='whole'))

# No augmentation: in a few hundred iterations random rescaling, crops that
# cut digits and colour distortion only slow the learning down. The test
# pipeline loads the label maps after Resize (a no-op here that pins the
# size), so evaluation is on the original maps.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# One loader worker keeps up with the small PNGs.
train_dataloader = dict(
    batch_size=16,
    num_workers=1,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# 800 iterations at lr 0.016 (mIoU 44.3 in calibration) instead of 1,200 at
# 0.004 (49.6): the demo's two tasks must train, compact and ExpandNet, in
# well under 15 minutes on 2 CPU cores.
max_iters = 800
warmup_iters = 50
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.016, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    # eta_min_ratio, not an absolute eta_min: it ends every param group at the
    # same fraction of its own rate (0.016 x 6.25e-4 = 1e-5 here), so an
    # ExpandNet's per-factor learning rates keep their ratios to the end.
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min_ratio=6.25e-4,
         by_epoch=False, begin=warmup_iters, end=max_iters)
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
log_processor = dict(window_size=50, by_epoch=False)

# The heads read the decoder at 1/4 and 1/8: the full-resolution decoder stage
# runs but feeds no loss, so DDP must look for unused parameters.
find_unused_parameters = True
