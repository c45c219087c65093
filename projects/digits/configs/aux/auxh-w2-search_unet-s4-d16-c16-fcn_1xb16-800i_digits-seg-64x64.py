# Hierarchical auxiliary over-parameterisation with a searched structure, on
# the compact digits U-Net (docs/methods.md, "Hierarchical auxiliary network").
# A training-only network A, twice as wide, has one block per level of the
# U-Net from its second encoder stage (1/4 of the input) through the bottleneck
# (1/16) and back up the decoder to 1/4, where its FCN head of twice the width
# (the copy of the compact decode head) has its own loss (auxnet.loss_ce). For the
# first 30% of the schedule the C -> A connections are gated and searched under
# a sparsity penalty; then the kept structure is logged, written into the
# checkpoint meta, and training goes on with it. Deployed: the compact U-Net.
#   python tools/train.py projects/digits/configs/aux/auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
#   python tools/test.py projects/digits/configs/digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py \
#       work_dirs/auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64/iter_800_compact.pth
_base_ = '../digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py'

model = dict(
    _delete_=True,
    type='AuxHierarchy',
    model={{_base_.model}},  # the compact U-Net, deployed as it is
    # Encoder stages 2 and 3 (1/4, 1/8), then the backbone's outputs: the
    # bottleneck (1/16) and the decoder at 1/8 and 1/4 (the head's input).
    levels=['backbone.encoder.1', 'backbone.encoder.2', 'backbone[0]', 'backbone[1]',
            'backbone[2]'],
    width_mult=2.0,
    aux_weight=1.0,
    search=dict(fraction=0.3, sparsity=0.005, threshold=0.5))
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
custom_hooks = [dict(type='AuxStructureHook')]
# The full-resolution decoder stage feeds no head, so some parameters get no
# gradient: static_graph=True (not with gradient accumulation).
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
