# The compact digits detector with the analysis hooks on, for the curves of docs/analysis.md:
# the gradient confusion every 30 iterations (GradientConfusionHook, 8 fixed mini-batches)
# and the L2 term of the weight decay (WeightDecayTermHook, at the logging steps).
# A shorter schedule than the digits config (300 iterations), validated every 100.
_base_ = '../digits/yolo-lite_1xb16-900i_digits-det-64x64.py'

max_iters = 300
warmup_iters = 50
train_cfg = dict(max_iters=max_iters, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min_ratio=2.5e-3,
         by_epoch=False, begin=warmup_iters, end=max_iters)
]
# log_metric_by_epoch=False: the validation metrics are written at their iteration (by
# default MMEngine writes them at the epoch, always 0 in an iteration-based loop).
# The analysis hooks sit under keys of default_hooks, which derived configs merge with
# (a custom_hooks list would be replaced whole): gradient_confusion=None turns one off.
default_hooks = dict(checkpoint=dict(interval=max_iters),
                     logger=dict(log_metric_by_epoch=False),
                     gradient_confusion=dict(type='GradientConfusionHook', interval=30,
                                             num_batches=8),
                     weight_decay_term=dict(type='WeightDecayTermHook'))
