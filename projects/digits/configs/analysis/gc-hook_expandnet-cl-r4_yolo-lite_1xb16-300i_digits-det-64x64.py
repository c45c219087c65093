# ExpandNet-CL (r=4) of gc-hook_yolo-lite_1xb16-300i_digits-det-64x64.py: the same data,
# schedule and analysis hooks; the hook also measures the compact space (the contracted
# weights). Weight decay on the factors (the default weight_decay_on='factors').
_base_ = './gc-hook_yolo-lite_1xb16-300i_digits-det-64x64.py'

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
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
