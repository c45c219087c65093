# ExpandNet-CL (r=4) of the compact YOLO-LITE-style detector on the 64x64 digits.
#
# Every 3x3 conv of the YOLOLite backbone and of the YOLOv3 neck and head is
# trained as a 1x1 -> 3x3 -> 1x1 chain with 4x the channels inside (online
# mode: the chain is composed into one kernel inside forward); the deployed
# model is the compact detector of the base config, trained on the same data
# with the same schedule.
_base_ = './yolo-lite_1xb16-900i_digits-det-64x64.py'

# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')
optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
