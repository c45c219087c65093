# Auxiliary over-parameterisation in its simplest form on the compact digits
# U-Net: a training-only FCN head of twice the width fed the decode head's
# input (AuxOverParam), to compare with the hierarchical auxiliary network of
# auxh-w2-*_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py on the same
# compact model and schedule.
_base_ = '../digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'

model = dict(
    _delete_=True,
    type='AuxOverParam',
    model={{_base_.model}},
    head='decode_head',
    width_mult=2.0,
    aux_weight=1.0)
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
# The full-resolution decoder stage feeds no head, so some parameters get no
# gradient: static_graph=True (not with gradient accumulation).
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
