# Digit segmentation dataset: sklearn's 8x8 handwritten digits composited onto
# 128x128 canvases, mmseg folder format. Generate it first with
#   python projects/digits/tools/make_digits_data.py --task seg
# Label maps: 0 background, digit + 1 on strokes, 255 on the thin blended
# edge band around each stroke (ignored by mmseg's losses and IoUMetric).
# Names the command that writes the data when data_root is missing (the
# project is imported from the repository root).
custom_imports = dict(imports=['projects.digits.data_hint'], allow_failed_imports=False)
dataset_type = 'BaseSegDataset'
data_root = 'data/digits_seg/'
# Canvas size; must match `--img-size` of projects/digits/tools/make_digits_data.py.
crop_size = (128, 128)

metainfo = dict(
    classes=('background', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'),
    palette=[(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25),
             (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
             (240, 50, 230), (210, 245, 60), (250, 190, 212)])

# No RandomFlip: a mirrored digit is a different (or no) digit, e.g. 2 vs 5,
# so flipping would corrupt the labels. Random rescaling is safe and widens
# the range of digit sizes; crops smaller than crop_size are padded by the
# model's data_preprocessor.
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
    # Annotations are loaded after Resize so that evaluation uses the
    # original label maps.
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(
            img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
