# Hierarchical auxiliary over-parameterisation, structure searched, on the
# compact Cityscapes U-Net (5 stages, 16 base channels, FCN head): a
# training-only network A, twice as wide, has one block per level of the
# U-Net's decoder path -- the bottleneck (1/16), then the decoder at 1/8, 1/4,
# 1/2 and 1/1, where its FCN head of twice the width (the copy of the compact
# decode head) has its own loss. For the first 30% of the schedule the C -> A
# connections are gated and searched; the structure kept is logged, written
# into the checkpoint meta (AuxStructureHook) and trained on. The deployed model
# is the compact U-Net: test its *_compact.pth with
# ../unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py.
_base_ = '../unet/unet-s5-d16-c16_fcn_4xb4-160k_cityscapes-512x1024.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='AuxHierarchy',
    model={{_base_.model}},
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

# Every parameter gets a gradient in every step (those the search drops are kept in
# the graph at weight 0): no static_graph / find_unused_parameters needed.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
