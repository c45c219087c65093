# The factor learning-rate rules on the digits tasks: compact, ExpandNet-CL r=4 with
# the fixed fan-in rule (x0.25; the U-Net config sets x0.1) and with the
# calibrated rule (no per-config multiplier), same schedule and seeds.
#   python tools/analysis/study.py projects/digits/studies/factor_lr_rule_seg.py \
#       --work-dir work_dirs/studies/factor_lr_rule_seg
# (the detection half: factor_lr_rule.py)
_configs = 'projects/digits/configs/digits/'
_calibrated = {
    'optim_wrapper.paramwise_cfg.factor_lr': 'calibrated',
    'optim_wrapper.paramwise_cfg.factor_lr_mult': 1.0,
    'default_hooks.expand_lr_calibration': dict(type='FactorLRCalibrationHook')}
configs = dict(
    compact=_configs + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    fan_in=_configs + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
    calibrated=dict(config=_configs + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
                    cfg_options=_calibrated))
seeds = [0, 1, 2]
metric = 'mIoU'
metric_scale = 1
