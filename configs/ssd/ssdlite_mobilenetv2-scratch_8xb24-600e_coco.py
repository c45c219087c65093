# Compact baseline: the stock mmdet SSDLite-MobileNetV2 (320x320, trained from
# scratch, 600 epochs) re-exported unchanged, as the local compact counterpart of
# configs/expandnet/expandnet-cl-r4_ssdlite-mobilenetv2-scratch_8xb24-600e_coco.py.
_base_ = 'mmdet::ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'
