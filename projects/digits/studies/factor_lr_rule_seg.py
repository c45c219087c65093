# factor_lr_rule.py on the digits segmentation task (x0.1, what the U-Net config set then):
#   python tools/analysis/study.py projects/digits/studies/factor_lr_rule_seg.py \
#       --work-dir work_dirs/studies/factor_lr_rule_seg
_base_ = './factor_lr_rule.py'
_configs = 'projects/digits/configs/digits/'
configs = dict(
    compact=_configs + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    fan_in=dict(
        config=_configs + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
        cfg_options={'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.1}),
    calibrated=dict(
        config=_configs + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'))
metric = 'mIoU'
metric_scale = 1
