# ExpandNet-CL (r=4) of YOLOX-tiny on COCO.
#
# Trains the 3x3 convs of the CSPDarknet backbone, the PAFPN neck and the
# decoupled head as 1x1 -> 3x3 -> 1x1 chains with 4x the channels inside,
# composed into one kernel per forward (online mode); the 1x1 convs stay
# compact (expand_1x1=True expands them too; fresh factors keep the heads'
# prior biases). Everything else of the stock recipe is inherited: Mosaic (tiny
# has no MixUp), the mode switch of the last 15 epochs, SGD with Nesterov
# momentum and no decay on norms / biases, and the EMA of the weights (the
# compact twin of a checkpoint is contracted from the EMA weights).
#
# ExpandNet options, hooks and per-factor learning rates: docs/user_guide.md
_base_ = '../yolox/yolox_tiny_8xb8-300e_coco.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='ExpandNet',
    model={{_base_.model}},
    strategy='cl',
    ratio=4,
    mode='online')

# SGD: the factors keep the base rate; the stock paramwise_cfg (norm_decay_mult=0,
# bias_decay_mult=0) is inherited and applies to the factors of the layers it names.
optim_wrapper = dict(constructor='ExpandNetOptimWrapperConstructor')

# expand_mm's hooks under default_hooks keys of their own: that dict merges into the
# base's, so the base's hooks (custom_hooks included) all stay.
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))

# Every parameter gets a gradient in each step, so no static_graph is needed.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
