# Issue 25: the factors' initialisation on the digits detector. 'fresh' (each factor
# PyTorch's standalone init, the paper) vs 'orthogonal' (the same norms, equal singular
# values) vs 'compact' (factorised exactly from the compact model's init) at r = 2 and
# 4, default factor rates, plain and distilled; the other cells are the acceptance grid's.
# Teacher first (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/factor_init.py \
#       --work-dir work_dirs/studies/factor_init
_base_ = './acceptance_grid_rate_cap.py'
_orth, _kd_orth = {'model.init': 'orthogonal'}, {'model.student.init': 'orthogonal'}
_comp, _kd_comp = {'model.init': 'compact'}, {'model.student.init': 'compact'}
configs = dict(
    r2_orth=dict(config={{_base_.configs.r4.config}}, cfg_options={'model.ratio': 2, **_orth}),
    r4_orth=dict(config={{_base_.configs.r4.config}}, cfg_options=_orth),
    kd_r2_orth=dict(config={{_base_.configs.kd_r4.config}},
                    cfg_options={'model.student.ratio': 2, **_kd_orth}),
    kd_r4_orth=dict(config={{_base_.configs.kd_r4.config}}, cfg_options=_kd_orth),
    r2_comp=dict(config={{_base_.configs.r4.config}}, cfg_options={'model.ratio': 2, **_comp}),
    r4_comp=dict(config={{_base_.configs.r4.config}}, cfg_options=_comp),
    kd_r2_comp=dict(config={{_base_.configs.kd_r4.config}},
                    cfg_options={'model.student.ratio': 2, **_kd_comp}),
    kd_r4_comp=dict(config={{_base_.configs.kd_r4.config}}, cfg_options=_kd_comp))
