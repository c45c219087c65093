# Auxiliary over-parameterisation on the digits U-Net: the compact model alone, the single
# head copy (AuxOverParam), a hand-picked hierarchical structure and the searched one
# (AuxHierarchy), three seeds, the same schedule. The score is the deployed compact model's.
#   python tools/analysis/study.py projects/digits/studies/aux_structure_seg.py \
#       --work-dir work_dirs/studies/aux_structure_seg
_configs = 'projects/digits/configs/'
configs = dict(
    compact=_configs + 'digits/unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    head_copy=_configs + 'aux/aux-w2_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
    hand_picked=_configs + 'aux/auxh-w2-fixed_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
    searched=_configs + 'aux/auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py')
seeds = [0, 1, 2]
metric = 'mIoU'
