# Compact YOLO-LITE-style detector on PASCAL VOC 07+12 at 224x224.
#
# YOLO-LITE (Pedoeem & Huang, 2018) is a plain stack of six 3x3
# conv-BN-LeakyReLU(0.1) layers (16-32-64-128-128-256 channels) with 2x2
# max-pools in between, trained on VOC at 224x224. Here that stack is the
# `YOLOLite` backbone of expand_mm, and mmdet's three-scale YOLOv3 neck and head
# (thin, so the backbone stays the bulk of the model) replace YOLO-LITE's single
# 1x1 region layer. Loss, assigner, test settings, optimizer, VOC data and
# evaluation come from the YOLOv3-MobileNetV2 VOC baseline; only the model, the
# input size and the 100-epoch schedule at 8 GPUs x 16 images change.
_base_ = '../yolov3/yolov3_mobilenetv2_8xb24-320-300e_voc0712.py'

# registers type='YOLOLite' (and ExpandNet, for the configs inheriting this one)
custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # no MobileNetV2 keys (and no ImageNet weights)
        type='YOLOLite',
        widths=(16, 32, 64, 128, 128, 256),
        kernel_size=3,
        out_indices=(3, 4, 5),  # strides 8, 16, 32
        norm_cfg=dict(type='BN'),
        act_cfg=dict(type='LeakyReLU', negative_slope=0.1)),
    neck=dict(
        in_channels=[256, 128, 128],  # deepest first
        out_channels=[64, 32, 32]),
    bbox_head=dict(
        in_channels=[64, 32, 32],
        out_channels=[128, 64, 64],
        # the base's 320x320 anchors scaled by 224 / 320 = 0.7
        anchor_generator=dict(
            base_sizes=[[(154, 88), (90, 155), (185, 186)],
                        [(25, 61), (71, 67), (42, 119)],
                        [(7, 11), (17, 25), (50, 29)]])))

input_size = (224, 224)  # YOLO-LITE's VOC input size
# the base's 320x320 pipelines with the input size changed
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='Expand',
        mean={{_base_.data_preprocessor.mean}},
        to_rgb={{_base_.data_preprocessor.bgr_to_rgb}},
        ratio_range=(1, 2)),
    dict(
        type='MinIoURandomCrop',
        min_ious=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        min_crop_size=0.3),
    dict(type='Resize', scale=input_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=input_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]

dataset_type = 'VOCDataset'
data_root = 'data/VOCdevkit/'
train_dataloader = dict(
    batch_size=16,
    dataset=dict(  # RepeatDataset(times=10) of VOC07+12 trainval, as in the base
        dataset=dict(
            datasets=[
                dict(
                    type=dataset_type,
                    data_root=data_root,
                    ann_file='VOC2007/ImageSets/Main/trainval.txt',
                    data_prefix=dict(sub_data_root='VOC2007/'),
                    filter_cfg=dict(filter_empty_gt=True, min_size=32),
                    pipeline=train_pipeline,
                    backend_args={{_base_.backend_args}}),
                dict(
                    type=dataset_type,
                    data_root=data_root,
                    ann_file='VOC2012/ImageSets/Main/trainval.txt',
                    data_prefix=dict(sub_data_root='VOC2012/'),
                    filter_cfg=dict(filter_empty_gt=True, min_size=32),
                    pipeline=train_pipeline,
                    backend_args={{_base_.backend_args}})
            ])))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# 10 epochs over RepeatDataset(times=10) = 100 VOC epochs (~12.9k iterations at
# 8x16); warm-up shortened from 4000 to 1000 iterations to fit the shorter run,
# lr scaled linearly from the base's 0.003 at batch 192 to batch 128.
train_cfg = dict(max_epochs=10)
optim_wrapper = dict(optimizer=dict(lr=0.002))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.0001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', by_epoch=True, milestones=[8, 9], gamma=0.1)
]
# base_batch_size = (8 GPUs) x (16 samples per GPU)
auto_scale_lr = dict(base_batch_size=128)

# The base sets find_unused_parameters=True for MobileNetV2, whose last 1x1
# conv feeds no output; every YOLOLite parameter gets a gradient, so DDP can
# skip its per-step search for unused parameters.
find_unused_parameters = False
