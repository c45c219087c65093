# Issue 25: seeds 3 and 4 of the acceptance grid's plain U-Net cells (r = 2 and r = 4,
# orthogonal factors, the default rate) and of its compact cell.
#   python tools/analysis/study.py projects/digits/studies/acceptance_seg_seeds34.py \
#       --work-dir work_dirs/studies/acceptance_seg_seeds34 --jobs 2
_digits = 'projects/digits/configs/digits/'
configs = dict(
    compact=_digits + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    r2_orth=dict(config=_digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
                 cfg_options={'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.09375,
                              'model.init': 'orthogonal', 'model.ratio': 2}),
    r4_orth=dict(config=_digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
                 cfg_options={'optim_wrapper.paramwise_cfg.factor_lr_mult': 0.09375,
                              'model.init': 'orthogonal'}))
seeds = [3, 4]
metric = 'mIoU'
