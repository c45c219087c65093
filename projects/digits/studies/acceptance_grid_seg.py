# Issue 25's acceptance grid on the digits U-Net: compact and ExpandNet-CL at r = 2 and 4,
# plain and distilled from the twice-wider U-Net, every ExpandNet at the default factor
# learning-rate multiplier (0.25; the configs' own 0.1 is overridden), the same seeds and
# schedule. Train the teacher first (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/acceptance_grid_seg.py \
#       --work-dir work_dirs/studies/acceptance_grid_seg
_digits = 'projects/digits/configs/digits/'
_distill = 'projects/digits/configs/distill/'
_expandnet = _digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
_kd_expandnet = _distill + 'kd-unet-c32_expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'
_default_mult = {'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.25}
# The factors' initialisation of these runs, pinned (factor_init*.py: 'orthogonal').
_fresh, _kd_fresh = {'model.init': 'fresh'}, {'model.student.init': 'fresh'}
configs = dict(
    compact=_digits + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    r2=dict(config=_expandnet, cfg_options={'model.ratio': 2, **_default_mult, **_fresh}),
    r4=dict(config=_expandnet, cfg_options={**_default_mult, **_fresh}),
    kd_compact=_distill + 'kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
    kd_r2=dict(config=_kd_expandnet, cfg_options={'model.student.ratio': 2, **_default_mult,
                                                   **_kd_fresh}),
    kd_r4=dict(config=_kd_expandnet, cfg_options={**_default_mult, **_kd_fresh}))
seeds = [0, 1, 2]
metric = 'mIoU'
