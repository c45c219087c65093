# Hierarchical auxiliary over-parameterisation, structure searched, on mmdet's
# YOLOv3-MobileNetV2 (320, COCO): a training-only network A, twice as wide, has
# one block per map of the MobileNetV2 backbone (strides 8, 16, 32) and of the
# YOLOv3 neck (32, 16, 8), each fed the previous block and -- where the
# structure keeps the connection -- the compact network's map through a 1x1
# adapter; its blocks at the neck's maps feed a YOLOv3 head of twice the width.
# For the first 30% of the schedule the connections are gated and searched;
# the structure kept is logged, written into the checkpoint meta
# (AuxStructureHook) and trained on. The deployed model is the compact
# detector: test its *_compact.pth with ../yolov3/yolov3_mobilenetv2_8xb24-320-300e_coco.py.
_base_ = '../yolov3/yolov3_mobilenetv2_8xb24-320-300e_coco.py'

custom_imports = dict(imports=['expand_mm'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='AuxHierarchy',
    model={{_base_.model}},
    width_mult=2.0,
    aux_weight=1.0,
    search=dict(fraction=0.3, sparsity=0.005, threshold=0.5),
    act_cfg=dict(type='LeakyReLU', negative_slope=0.1),
    probe_size=(320, 320))

default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill and a resume that continues exactly.
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
custom_hooks = [dict(type='AuxStructureHook')]

# static_graph=True: the backbone's last 1x1 conv runs but feeds no output (as in
# the compact config's ExpandNet). Parameters the search drops keep a zero gradient
# (AuxHierarchy adds them times 0), so the set of used parameters never changes.
model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel', static_graph=True)
