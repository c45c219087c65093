# Compact baseline: the stock mmseg FCN on a dilated MobileNetV2 (output stride
# 8, Cityscapes 512x1024, 80k iterations) re-exported unchanged, as the local
# compact counterpart of configs/expandnet/
# expandnet-cl-r4_mobilenet-v2-d8-fcn_4xb2-80k_cityscapes-512x1024.py.
_base_ = 'mmseg::mobilenet_v2/mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py'
