# Hierarchical auxiliary over-parameterisation with a searched structure, on
# the compact digits YOLO-LITE-style detector (docs/methods.md, "Hierarchical
# auxiliary network"). A training-only network A, twice as wide, has one block
# per map of the backbone (strides 8, 16, 32) and of the neck (32, 16, 8); its
# blocks at the neck's maps feed a YOLOv3 head of twice the width, with its own
# losses (logged as auxnet.loss_*). For the first 30% of the schedule every
# C -> A connection has a sigmoid gate trained under a sparsity penalty; then
# the connections whose gate is >= 0.5 are kept, the structure is logged with
# the config line that reproduces it (and written into the checkpoint meta),
# and training goes on with it. Prediction, validation and the compact
# checkpoint use the compact detector only:
#   python tools/train.py projects/digits/configs/aux/auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64.py
#   python tools/test.py projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py \
#       work_dirs/auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64/iter_900_compact.pth
_base_ = '../digits/yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(
    _delete_=True,
    type='AuxHierarchy',
    model={{_base_.model}},  # the compact detector, deployed as it is
    width_mult=2.0,
    aux_weight=1.0,
    search=dict(fraction=0.3, sparsity=0.005, threshold=0.5),
    act_cfg=dict(type='LeakyReLU', negative_slope=0.1))
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
custom_hooks = [dict(type='AuxStructureHook')]
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')
