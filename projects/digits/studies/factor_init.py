# Issue 25: the factors' initialisation on the digits detector. 'fresh' (each factor
# PyTorch's standalone init, the paper) vs 'orthogonal' (the same norms, equal singular
# values) at r = 2 and 4, default factor rates, plain and
# distilled; the other cells are the acceptance grid's. Teacher first
# (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/factor_init.py \
#       --work-dir work_dirs/studies/factor_init
_base_ = './acceptance_grid_rate_cap.py'
_expandnet = 'projects/digits/configs/digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
_kd_expandnet = ('projects/digits/configs/distill/'
                 'kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py')
configs = dict(
    r2_orth=dict(config=_expandnet, cfg_options={'model.ratio': 2, 'model.init': 'orthogonal'}),
    r4_orth=dict(config=_expandnet, cfg_options={'model.init': 'orthogonal'}),
    kd_r2_orth=dict(config=_kd_expandnet, cfg_options={'model.student.ratio': 2,
                                                        'model.student.init': 'orthogonal'}),
    kd_r4_orth=dict(config=_kd_expandnet, cfg_options={'model.student.init': 'orthogonal'}))
