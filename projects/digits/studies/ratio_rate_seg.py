# Issue 25: does r = 2 train below r = 4 because it steps slower? Under the default
# rates the first Adam step of an orthogonal r = 2 chain moves its composed kernel, per
# unit rate, 1/1.59 as far as an r = 4 chain's (median over the U-Net's 16 expanded
# layers: lr_calibration.calibrated_scale 0.439 against 0.276). These cells give r = 2
# the r = 4 chain's first step: the default multiplier 0.09375 x 1.59 = 0.149; the
# control gives distilled r = 4 the default r = 2 chain's step (0.09375 / 1.59 = 0.059;
# plain r = 4 near it: factor_rate_orthogonal_seg.py's 1e-3 cell). Compact and default
# cells are factor_init_seg.py's runs. Teacher first, then:
#   python tools/analysis/study.py projects/digits/studies/ratio_rate_seg.py \
#       --work-dir work_dirs/studies/ratio_rate_seg
_base_ = './acceptance_grid_rate_cap_seg.py'
_mult = 'optim_wrapper.paramwise_cfg.factor_lr_mult'
configs = dict(
    _delete_=True,
    r2_matched=dict(config={{_base_.configs.r4.config}},
                    cfg_options={'model.ratio': 2, 'model.init': 'orthogonal', _mult: 0.149}),
    kd_r2_matched=dict(config={{_base_.configs.kd_r4.config}},
                       cfg_options={'model.student.ratio': 2, 'model.student.init': 'orthogonal',
                                    _mult: 0.149}),
    kd_r4_slowed=dict(config={{_base_.configs.kd_r4.config}},
                      cfg_options={'model.student.init': 'orthogonal', _mult: 0.059}))
