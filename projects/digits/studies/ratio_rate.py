# Issue 25: does r = 2 train below r = 4 because it steps slower? Under the default
# rates the first Adam step of an orthogonal r = 2 chain moves its composed kernel, per
# unit rate, 1/1.73 as far as an r = 4 chain's (median over the detector's 15 expanded
# layers: lr_calibration.calibrated_scale 3.13 against 1.81). These cells give r = 2
# the r = 4 chain's first step: the default multiplier 0.375 x 1.73 = 0.649. Compact
# and default cells are factor_init.py's runs. Teacher first, then:
#   python tools/analysis/study.py projects/digits/studies/ratio_rate.py \
#       --work-dir work_dirs/studies/ratio_rate
_base_ = './acceptance_grid_rate_cap.py'
_mult = 'optim_wrapper.paramwise_cfg.factor_lr_mult'
configs = dict(
    _delete_=True,
    r2_matched=dict(config={{_base_.configs.r4.config}},
                    cfg_options={'model.ratio': 2, 'model.init': 'orthogonal', _mult: 0.649}),
    kd_r2_matched=dict(config={{_base_.configs.kd_r4.config}},
                       cfg_options={'model.student.ratio': 2, 'model.student.init': 'orthogonal',
                                    _mult: 0.649}))
