# Issue 25's "when does it help" study on the digits U-Net: model width (0.25x, 0.5x, 1x
# the channels of every layer: base_channels 4 / 8 / 16, the heads' widths with them) x
# schedule length (1x, 2x, 4x the 800 iterations, every scheduler stretched along) x
# {compact, ExpandNet-CL r=4 at the default factor rates}. Runs go seed by seed.
#   python tools/analysis/study.py projects/digits/studies/width_schedule_seg.py \
#       --work-dir work_dirs/studies/width_schedule_seg --jobs 2
_digits = 'projects/digits/configs/digits/'
configs = dict(
    compact=_digits + 'unet-s4-d16-c16_fcn_1xb16-800i_digits-seg-64x64.py',
    r4=dict(config=_digits + 'expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py',
            cfg_options={'model.init': 'fresh'}))


def _width(scale):
    """The U-Net's channel settings at ``scale`` times the digits widths."""
    base = int(16 * scale)
    return {'backbone.base_channels': base,
            'decode_head.in_channels': 2 * base, 'decode_head.channels': 2 * base,
            'auxiliary_head.in_channels': 4 * base, 'auxiliary_head.channels': 2 * base}


def _level(scale):
    """Per-config keys: the ExpandNet wraps the segmentor under model.model."""
    keys = _width(scale)
    return dict(per_config=dict(compact={f'model.{k}': v for k, v in keys.items()},
                                r4={f'model.model.{k}': v for k, v in keys.items()}))


axes = dict(width={'0.25x': _level(0.25), '0.5x': _level(0.5), '1x': {}},
            schedule={'1x': dict(schedule_scale=1), '2x': dict(schedule_scale=2),
                      '4x': dict(schedule_scale=4)})
del _width, _level
seeds = [0, 1, 2]
metric = 'mIoU'
