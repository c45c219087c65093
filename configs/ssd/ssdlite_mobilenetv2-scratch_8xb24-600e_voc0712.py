# Compact baseline on PASCAL VOC 07+12: mmdet ships SSDLite-MobileNetV2 only for
# COCO, so this keeps the COCO config (model, 320x320 pipelines, optimizer and
# 600-epoch schedule) and changes only the data -- VOC2007+2012 trainval for
# training, VOC2007 test for evaluation, as in mmdet's
# _base_/datasets/voc0712.py -- and the number of classes.
_base_ = './ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'

model = dict(bbox_head=dict(num_classes=20))

dataset_type = 'VOCDataset'
data_root = 'data/VOCdevkit/'
train_dataloader = dict(
    dataset=dict(  # the base's RepeatDataset (times=5) is kept
        dataset=dict(
            _delete_=True,
            type='ConcatDataset',
            # VOCDataset adds `dataset_type` to its metainfo; ConcatDataset would
            # reject the two differing values (as in mmdet's voc0712.py).
            ignore_keys=['dataset_type'],
            datasets=[
                dict(
                    type=dataset_type,
                    data_root=data_root,
                    ann_file='VOC2007/ImageSets/Main/trainval.txt',
                    data_prefix=dict(sub_data_root='VOC2007/'),
                    # as in mmdet's ssd300_voc0712.py (no bbox_min_size)
                    filter_cfg=dict(filter_empty_gt=True, min_size=32),
                    pipeline={{_base_.train_pipeline}}),
                dict(
                    type=dataset_type,
                    data_root=data_root,
                    ann_file='VOC2012/ImageSets/Main/trainval.txt',
                    data_prefix=dict(sub_data_root='VOC2012/'),
                    filter_cfg=dict(filter_empty_gt=True, min_size=32),
                    pipeline={{_base_.train_pipeline}})
            ])))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='VOC2007/ImageSets/Main/test.txt',
        data_prefix=dict(sub_data_root='VOC2007/'),
        test_mode=True,
        pipeline={{_base_.test_pipeline}}))
test_dataloader = val_dataloader

# VOC2007 test is evaluated with the 11-point mAP, as in mmdet's VOC configs.
val_evaluator = dict(_delete_=True, type='VOCMetric', metric='mAP', eval_mode='11points')
test_evaluator = val_evaluator
