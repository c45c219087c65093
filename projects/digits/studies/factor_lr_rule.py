# The factor learning-rate rules on the digits tasks: compact, ExpandNet-CL r=4 with
# the fixed fan-in rule (x0.25; the U-Net config set x0.1) and with the
# calibrated rule (no per-config multiplier), same schedule and seeds.
#   python tools/analysis/study.py projects/digits/studies/factor_lr_rule.py \
#       --work-dir work_dirs/studies/factor_lr_rule
# (the segmentation half: factor_lr_rule_seg.py)
_configs = 'projects/digits/configs/digits/'
_calibrated = {
    'optim_wrapper.paramwise_cfg.factor_lr': 'calibrated',
    'optim_wrapper.paramwise_cfg.factor_lr_mult': 1.0,
    'default_hooks.expand_lr_calibration': dict(type='FactorLRCalibrationHook'),
    'model.init': 'fresh'}
# What these runs used, pinned: the fixed multiplier and the factors' init of their time
# (the defaults are now min(1, 1.5e-3 / lr) and 'orthogonal').
_fan_in = {'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.25, 'model.init': 'fresh'}
configs = dict(
    compact=_configs + 'yolo-lite_1xb16-900i_digits-det-64x64.py',
    fan_in=dict(config=_configs + 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py',
                cfg_options=_fan_in),
    calibrated=dict(config=_configs + 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py',
                    cfg_options=_calibrated))
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
