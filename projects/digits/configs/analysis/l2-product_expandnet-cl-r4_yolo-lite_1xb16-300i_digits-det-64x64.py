# gc-hook_expandnet-cl-r4_yolo-lite_1xb16-300i_digits-det-64x64.py with the weight decay on
# the composed (compact) kernels instead of on each factor: the "Product L2" of the
# ExpandNets paper, against that config's "Normal L2" (same AdamW weight_decay=0.01).
# Only the L2 term is logged here (no gradient confusion: a quarter less training time).
_base_ = './gc-hook_expandnet-cl-r4_yolo-lite_1xb16-300i_digits-det-64x64.py'

optim_wrapper = dict(paramwise_cfg=dict(weight_decay_on='product'))
default_hooks = dict(gradient_confusion=None)
