# Issue 25's "when does it help" study on the digits U-Net: width_schedule.py's grid
# (1x/2x/4x schedules, 3 seeds, compact vs ExpandNet-CL r=4) with the U-Net at 0.25x,
# 0.5x, 1x the channels of every layer (base_channels 4 / 8 / 16, the heads' widths
# with them). The r=4 entry pins init='fresh', the setting of the detector's study.
#   python tools/analysis/study.py projects/digits/studies/width_schedule_seg.py \
#       --work-dir work_dirs/studies/width_schedule_seg --jobs 2
_base_ = './width_schedule.py'
_digits = 'projects/digits/configs/digits/'
configs = dict(
    _delete_=True,
    compact=_digits + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    r4=dict(config=_digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
            cfg_options={'model.init': 'fresh'}))


def _unet_level(scale):
    """Per-config keys of the U-Net at ``scale`` times the digits widths."""
    base = int(16 * scale)
    keys = {'backbone.base_channels': base,
            'decode_head.in_channels': 2 * base, 'decode_head.channels': 2 * base,
            'auxiliary_head.in_channels': 4 * base, 'auxiliary_head.channels': 2 * base}
    return dict(per_config={name: {prefix + k: v for k, v in keys.items()}
                            for name, prefix in (('compact', 'model.'), ('r4', 'model.model.'))})


axes = dict(width=dict(_delete_=True, **{'0.25x': _unet_level(0.25),
                                         '0.5x': _unet_level(0.5), '1x': {}}))
del _unet_level
metric = 'mIoU'
metric_scale = 1
