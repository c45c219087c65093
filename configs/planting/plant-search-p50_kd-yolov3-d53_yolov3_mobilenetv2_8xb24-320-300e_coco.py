# Channel planting as an architecture search (Mitsuno et al., ICPR 2020) on
# mmdet's YOLOv3-MobileNetV2 (320x320, COCO), distilled from mmdet's
# YOLOv3-DarkNet53 (320x320), stopping at half of the stock parameters.
#
# Planted: the YOLOv3 neck and the head's bridge convs (plain conv -> BN ->
# LeakyReLU chains; each detection block of the neck grows as one candidate).
# MobileNetV2's backbone stays as it is: its inverted-residual blocks end in
# residual adds and read their expansions with depthwise convs, whose channels
# cannot be narrowed on their own (the hook refuses such units by name).
#
# Distillation: feature imitation on the neck outputs (1x1 adapters). No logit
# distillation: the two detectors use different anchors, so their objectness /
# class maps do not describe the same boxes.
#
# Every 2,000 iterations the candidates are ranked on 512 training images held
# out by the hook (first-order held-out gain per added parameter); the best two
# gain a quarter of their width, the old weights frozen. The network found is
# written as planted_subnet.py + planted_subnet.pth in the work dir (channels
# never planted removed; loads strictly through mmdet.apis.init_detector).
#
#   python tools/train.py configs/planting/plant-search-p50_kd-yolov3-d53_yolov3_mobilenetv2_8xb24-320-300e_coco.py
#   python tools/test.py WORK_DIR/planted_subnet.py WORK_DIR/planted_subnet.pth
_base_ = '../yolov3/yolov3_mobilenetv2_8xb24-320-300e_coco.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

compact_model = {{_base_.model}}
model = dict(
    _delete_=True,
    type='Distiller',
    student=compact_model,
    teacher='mmdet::yolo/yolov3_d53_8xb8-320-273e_coco.py',
    teacher_ckpt='https://download.openmmlab.com/mmdetection/v2.0/yolo/yolov3_d53_320_273e_coco/'
    'yolov3_d53_320_273e_coco-421362b6.pth',
    distill_losses=[
        dict(
            type='FeatureImitationLoss',
            student='neck',
            student_channels=[96, 96, 96],
            teacher_channels=[512, 256, 128],
            loss_weight=1.0,
            loss_name='loss_feat'),
    ])

default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))

custom_hooks = [
    dict(
        type='ChannelPlantingSearchHook',
        include=['neck.*', 'bbox_head.convs_bridge.*'],
        candidates=[['neck.detect1.*'], ['neck.detect2.*'], ['neck.detect3.*']],
        start_fraction=0.25,
        step_fraction=0.25,
        # The narrow network trains alone for about a third of the ~183k
        # iterations (10 of the 30 repeated epochs at 8x24): on the digits
        # detector a first step during the warm-up froze an untrained network
        # (docs/methods.md). Not tuned on COCO.
        begin=60000,
        interval=2000,
        units_per_step=2,
        budget=dict(params=0.5),
        probe='taylor',
        heldout=dict(num_samples=512, seed=0, batch_size=24)),
]
