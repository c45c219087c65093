# Compact baseline: the stock mmdet YOLOX-tiny (416x416 test size, 300 epochs,
# Mosaic, EMA; tiny's pipeline has no MixUp) is already the compact model; it
# is re-exported here so that the ExpandNet config has a local compact
# counterpart to inherit and compare with. The contracted ExpandNet checkpoint
# loads into this config.
_base_ = 'mmdet::yolox/yolox_tiny_8xb8-300e_coco.py'
