# Issue 25: is the default factor-rate ceiling (1.5e-3, measured with fresh factors) right
# for orthogonal ones? ExpandNet-CL r=4 on the digits U-Net with init='orthogonal' at
# the default (1.5e-3 / lr) and at factor base rates 1e-3 and 2e-3; compact and default
# cells are the same runs as factor_init_seg.py's. Then:
#   python tools/analysis/study.py projects/digits/studies/factor_rate_orthogonal_seg.py \
#       --work-dir work_dirs/studies/factor_rate_orthogonal_seg
_base_ = './acceptance_grid_rate_cap_seg.py'
_orth = {'model.init': 'orthogonal'}
_mult = 'optim_wrapper.paramwise_cfg.factor_lr_mult'  # base rate / the config's lr 0.016
configs = dict(
    _delete_=True,
    compact={{_base_.configs.compact}},
    r4_orth=dict(config={{_base_.configs.r4.config}}, cfg_options=_orth),
    r4_orth_rate1e3=dict(config={{_base_.configs.r4.config}}, cfg_options={**_orth, _mult: 0.0625}),
    r4_orth_rate2e3=dict(config={{_base_.configs.r4.config}}, cfg_options={**_orth, _mult: 0.125}))
