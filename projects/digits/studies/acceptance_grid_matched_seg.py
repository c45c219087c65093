# Issue 25's acceptance grid on the digits U-Net under the step-matched factor rates
# (paramwise_cfg.factor_lr='matched', docs/studies.md): ExpandNet-CL at r = 2 and 4, plain
# and distilled from the twice-wider U-Net, every ExpandNet starting from the default
# multiplier 0.25 (the configs' own 0.1 is overridden), the same seeds and schedule as
# acceptance_grid_seg.py, whose compact cells are the reference. Train the teacher first
# (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/acceptance_grid_matched_seg.py \
#       --work-dir work_dirs/studies/acceptance_grid_matched_seg
_digits = 'projects/digits/configs/digits/'
_distill = 'projects/digits/configs/distill/'
_expandnet = _digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
_kd_expandnet = _distill + 'kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
_matched = {'optim_wrapper.paramwise_cfg.factor_lr': 'matched',
            'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.25}
configs = dict(
    r4=dict(config=_expandnet, cfg_options=_matched),
    kd_r4=dict(config=_kd_expandnet, cfg_options=_matched),
    r2=dict(config=_expandnet, cfg_options={'model.ratio': 2, **_matched}),
    kd_r2=dict(config=_kd_expandnet, cfg_options={'model.student.ratio': 2, **_matched}))
seeds = [0, 1, 2]
metric = 'mIoU'
