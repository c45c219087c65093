# Knowledge distillation into the compact digits YOLO-LITE-style detector
# itself (no expansion): the reference for the ExpandNet student of
# ./kd-yolo-lite-w2_expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py
# (same teacher, same losses) and the base of the channel-planting config
# ../planting/plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py.
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# then:
#   python tools/train.py projects/digits/configs/distill/kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py
# iter_900_compact.pth (the student alone) loads strictly into
# ../digits/yolo-lite_1xb16-900i_digits-det-64x64.py.
_base_ = '../digits/yolo-lite_1xb16-900i_digits-det-64x64.py'

num_classes = 10
# The stock compact detector; named so that the ExpandNet-student config can build
# its ExpandNet from it.
compact_model = {{_base_.model}}
model = dict(
    _delete_=True,
    type='Distiller',
    student=compact_model,
    teacher='{{fileDirname}}/yolo-lite-w2_1xb16-900i_digits-det-64x64.py',
    teacher_ckpt='work_dirs/yolo-lite-w2_1xb16-900i_digits-det-64x64/iter_900.pth',
    distill_losses=[
        dict(
            type='LogitsKDLoss',
            student='bbox_head',
            activation='sigmoid',
            temperature=1.0,
            group_size=5 + num_classes,
            channels=(4, 5 + num_classes),
            reduction='sum',
            loss_weight=1.0,
            loss_name='loss_kd'),
        dict(
            type='FeatureImitationLoss',
            student='neck',
            student_channels=[64, 32, 32],
            teacher_channels=[128, 64, 64],
            loss_weight=1.0,
            loss_name='loss_feat'),
    ])

# Write iter_N_compact.pth beside every checkpoint: the student alone (the
# teacher and the feature adapters are training-only). ExpandCheckpointLoadHook
# lets load_from= a stock compact checkpoint start the student (its keys are put
# under 'student.'); without it nothing of such a checkpoint would load.
default_hooks = dict(
    expand_load=dict(type='ExpandCheckpointLoadHook'),
    expand_contract=dict(type='ContractCheckpointHook'),
    expand_check=dict(type='ExpandNetCheckHook'),
    # Saves that survive a kill (the base's interval and max_keep_ckpts kept) and a
    # resume that continues exactly (random generators' states in the checkpoint).
    checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'))
