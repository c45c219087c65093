# Auxiliary over-parameterisation on the digits detector: the compact model alone, the
# single head copy (AuxOverParam), a hand-picked hierarchical structure and the searched one
# (AuxHierarchy), three seeds, the same schedule. The score is the deployed compact model's.
#   python tools/analysis/study.py projects/digits/studies/aux_structure.py \
#       --work-dir work_dirs/studies/aux_structure
_configs = 'projects/digits/configs/'
configs = dict(
    compact=_configs + 'digits/yolo-lite_1xb16-900i_digits-det-64x64.py',
    head_copy=_configs + 'aux/aux-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
    hand_picked=_configs + 'aux/auxh-w2-fixed_yolo-lite_1xb16-900i_digits-det-64x64.py',
    searched=_configs + 'aux/auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64.py')
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
