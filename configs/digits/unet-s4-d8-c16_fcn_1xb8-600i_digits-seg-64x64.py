# Compact U-Net (16 base channels, 4 stages) + FCN head on the 64x64 digits
# segmentation set.
#
# The model of ../unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py
# (mmseg's UNet + FCN head with 16 instead of 64 base channels) with one stage
# fewer, sized to train in a few CPU minutes (tools/demo.py; calibration in
# its report):
# - 64x64 canvases with 16-32 px digits. Four stages (three 2x downsamplings)
#   give the deepest features a 68 px receptive field, more than a digit,
#   which telling digits apart needs. The fifth stage of the stock U-Net
#   (256 channels at 4x4) would hold 60% of the parameters and 85% of the
#   kernel composition that an online ExpandNet pays per step.
# - cross-entropy + Dice (as in mmseg's unet *_ce-1.0-dice-3.0_* configs):
#   digit pixels are 11% of the image, and with cross-entropy alone the model
#   predicted background everywhere for the first several hundred iterations
#   (mIoU 8).
# - 11 classes (background + 0-9), plain BN (one device), whole-image
#   inference, a short AdamW schedule.
_base_ = [
    'mmseg::_base_/models/fcn_unet_s5-d16.py',
    '../_base_/datasets/digits_seg.py',
    'mmseg::_base_/default_runtime.py',
]

# Written by: python tools/make_digits_data.py --out data/digits64 --img-size 64
#             --min-scale 16 --max-scale 32 --max-digits 4
# (tools/demo.py generates it when missing).
data_root = 'data/digits64/digits_seg/'
crop_size = (64, 64)

base_channels = 16
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        base_channels=base_channels,
        num_stages=4,
        strides=(1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg=norm_cfg),
    # As in the compact U-Net config: the heads read the last decoder stage
    # (in_index=3: base_channels) and the one before it (in_index=2:
    # 2 * base_channels), hidden width base_channels.
    decode_head=dict(
        in_channels=base_channels,
        in_index=3,
        channels=base_channels,
        num_classes=11,
        norm_cfg=norm_cfg,
        loss_decode=[
            dict(type='CrossEntropyLoss', loss_name='loss_ce', loss_weight=1.0),
            dict(type='DiceLoss', loss_name='loss_dice', loss_weight=3.0)
        ]),
    auxiliary_head=dict(
        in_channels=2 * base_channels,
        in_index=2,
        channels=base_channels,
        num_classes=11,
        norm_cfg=norm_cfg,
        loss_decode=[
            dict(type='CrossEntropyLoss', loss_name='loss_ce', loss_weight=0.4),
            dict(type='DiceLoss', loss_name='loss_dice', loss_weight=1.2)
        ]),
    test_cfg=dict(mode='whole'))

# The base's pipelines with the 64x64 crop size.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=crop_size,
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# One loader worker keeps up with the small PNGs without taking the
# training's core.
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 600
warmup_iters = 50
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.002, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min=1e-5,
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
