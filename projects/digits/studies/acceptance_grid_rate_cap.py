# Issue 25's acceptance grid on the digits detector at the default factor rate of the 'fan_in'
# rule: the factors' base rate is min(lr, 1.5e-3) (docs/studies.md). The ExpandNet cells set
# the multiplier that rule gives here (1.5e-3 / lr) explicitly, as the runs of the table did;
# the compact cells are those of acceptance_grid*.py (same configs and seeds). Teacher first
# (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/acceptance_grid_rate_cap.py \
#       --work-dir work_dirs/studies/acceptance_grid_rate_cap
_digits = 'projects/digits/configs/digits/'
_distill = 'projects/digits/configs/distill/'
_expandnet = _digits + 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
_kd_expandnet = _distill + 'kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
_rate = {'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.375}  # = 1.5e-3 / lr
configs = dict(
    compact=_digits + 'yolo-lite_1xb16-900i_digits-det-64x64.py',
    r2=dict(config=_expandnet, cfg_options={'model.ratio': 2, **_rate}),
    r4=dict(config=_expandnet, cfg_options=_rate),
    kd_compact=_distill + 'kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
    kd_r2=dict(config=_kd_expandnet, cfg_options={'model.student.ratio': 2, **_rate}),
    kd_r4=dict(config=_kd_expandnet, cfg_options=_rate))
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
