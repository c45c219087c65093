# ExpandNet-CL (r=4) of the digits YOLO-LITE detector, initialised from its
# nonlinear counterpart (ExpandNets, "ExpandNet initialization").
#
# For the first 300 of the 900 iterations every expanded layer runs its chain
# 1x1 -> 3x3 -> 1x1 in explicit mode with a ReLU between the sub-layers (a
# deeper nonlinear network with the same factors); then NonlinearInitHook
# removes the ReLUs and training continues as the linear ExpandNet of the base
# config, which contracts to the compact detector. The switch changes the
# function the factors compute, so it is placed a third of the way in: past
# the 50-iteration warm-up, while the cosine rate is still ~80% of its peak,
# leaving two thirds of the schedule for the linear network to recover and
# converge. Explicit mode costs several times an online step, so a longer
# nonlinear phase would also dominate the run time. Checkpoints saved during
# the nonlinear phase have no compact form; ContractCheckpointHook skips them.
_base_ = './expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'

nonlinear_iters = 300  # = max_iters // 3

# The base's default_hooks (expand_mm's checkpoint and check hooks) are inherited.
custom_hooks = [
    dict(type='NonlinearInitHook', act_cfg=dict(type='ReLU'), end=nonlinear_iters),
]
