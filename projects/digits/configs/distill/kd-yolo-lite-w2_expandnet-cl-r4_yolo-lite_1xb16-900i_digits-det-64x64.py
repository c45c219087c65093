# Knowledge distillation into an ExpandNet: the ExpandNet-CL (r=4) of the
# compact digits YOLO-LITE-style detector learns from the labels and from a
# trained detector of twice its width.
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# then this config:
#   python tools/train.py projects/digits/configs/distill/kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py
# Every saved checkpoint gets a *_compact.pth twin: the student alone,
# contracted, which loads strictly into and is evaluated with the compact config
#   python tools/test.py projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py \
#       work_dirs/kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64/iter_900_compact.pth
# (the teacher and the feature adapters are training-only).
_base_ = './kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'

# The teacher and the distillation losses are the base's; the student becomes
# the ExpandNet of the compact detector, as in
# ../digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py.
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
model = dict(
    student=dict(
        _delete_=True,
        type='ExpandNet',
        model={{_base_.compact_model}},
        strategy='cl',
        ratio=4,
        mode='online'))
# The default factor rates (base rate 1.5e-3, x0.375 of AdamW 0.004). With this
# teacher, mAP at seed 0: 36.7 / 41.5 / 42.5 / 41.6 at multipliers 0.1 / 0.25 /
# 0.5 / 1.0 (set with `--cfg-options optim_wrapper.paramwise_cfg.factor_lr_mult=X`;
# projects/digits/README.md, "Calibration"; docs/studies.md for three seeds).
optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
