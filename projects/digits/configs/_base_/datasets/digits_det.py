# Digit detection dataset: sklearn's 8x8 handwritten digits composited onto
# 128x128 canvases, COCO format. Generate it first with
#   python projects/digits/tools/make_digits_data.py --task det
# Category ids in the json are 1..10 named '0'..'9'; CocoDataset maps them to
# labels 0..9 by name through `metainfo['classes']`.
# Names the command that writes the data when data_root is missing (the
# project is imported from the repository root).
custom_imports = dict(imports=['projects.digits.data_hint'], allow_failed_imports=False)
dataset_type = 'CocoDataset'
data_root = 'data/digits_det/'
backend_args = None

# Must match `--img-size` of projects/digits/tools/make_digits_data.py; at the default the
# Resize is a no-op that only pins the input size.
img_scale = (128, 128)

metainfo = dict(
    classes=('0', '1', '2', '3', '4', '5', '6', '7', '8', '9'),
    palette=[(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
             (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
             (210, 245, 60), (250, 190, 212)])

# No RandomFlip: a mirrored digit is a different (or no) digit, e.g. 2 vs 5,
# so flipping would corrupt the labels.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # Annotations are loaded after Resize so that evaluation uses the
    # original boxes; drop this step for data without annotations.
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

# `ann_file` is resolved here, when this file is parsed: a config that
# changes `data_root` must set the evaluator's ann_file again.
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
