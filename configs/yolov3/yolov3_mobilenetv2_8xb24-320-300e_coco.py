# Compact baseline: the stock mmdet YOLOv3-MobileNetV2 (320x320, 300 epochs) is
# already the compact model; it is re-exported here so that every ExpandNet
# config in configs/expandnet/ has a local compact counterpart to inherit and
# compare with. The contracted ExpandNet checkpoint loads into this config.
_base_ = 'mmdet::yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py'
