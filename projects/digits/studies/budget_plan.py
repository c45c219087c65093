# Does a budgeted plan keep the gain? The digits detector: compact, ExpandNet-CL r=4 on
# every layer, and the plan of budget=dict(train_step=1.10, train_memory=1.10).
#   python tools/analysis/study.py projects/digits/studies/budget_plan.py \
#       --work-dir work_dirs/studies/budget_plan
_configs = 'projects/digits/configs/'
# What these runs used, pinned: the multiplier and the factors' init of their time (the
# defaults are now min(1, 1.5e-3 / lr) and 'orthogonal').
_then = {'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.25, 'model.init': 'fresh'}
configs = dict(
    compact=_configs + 'digits/yolo-lite_1xb16-900i_digits-det-64x64.py',
    r4=dict(config=_configs + 'digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py',
            cfg_options=_then),
    budget=dict(
        config=_configs + 'budget/expandnet-cl-budget1.10_yolo-lite_1xb16-900i_digits-det-64x64.py',
        cfg_options=_then))
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
