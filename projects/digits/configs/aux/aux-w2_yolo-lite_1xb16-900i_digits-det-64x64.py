# Auxiliary over-parameterisation in its simplest form on the compact digits
# YOLO-LITE-style detector: a training-only YOLOv3 head of twice the width fed
# the neck's maps (AuxOverParam), to compare with the hierarchical auxiliary
# network of auxh-w2-*_yolo-lite_1xb16-900i_digits-det-64x64.py on the same
# compact model and schedule.
_base_ = '../digits/yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(
    _delete_=True,
    type='AuxOverParam',
    model={{_base_.model}},
    head='bbox_head',
    width_mult=2.0,
    aux_weight=1.0)
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
