# Issue 25's acceptance grid on the digits U-Net (acceptance_grid_seg.py) at the default
# factor rate of the 'fan_in' rule, whose base rate is min(lr, 1.5e-3) (docs/studies.md).
# The ExpandNet cells set the multiplier that gives here (1.5e-3 / lr) explicitly, as the
# runs of the table did; the compact cells are acceptance_grid_seg.py's. Teacher first
# (projects/digits/configs/distill), then:
#   python tools/analysis/study.py projects/digits/studies/acceptance_grid_rate_cap_seg.py \
#       --work-dir work_dirs/studies/acceptance_grid_rate_cap_seg
_base_ = './acceptance_grid_seg.py'
_rate = dict(cfg_options={'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.09375})
configs = dict(r2=_rate, r4=_rate, kd_r2=_rate, kd_r4=_rate)
