# Issue 25's "when does it help" study on the digits detector: model width (0.25x, 0.5x, 1x
# the channels of every layer of backbone, neck and head) x schedule length (1x, 2x, 4x the
# 900 iterations, every scheduler stretched along) x {compact, ExpandNet-CL r=4 at the
# default factor rates}. The paper's premise: expansion helps compact networks more the
# smaller they are. Runs go seed by seed, so a study cut short has comparable cells.
#   python tools/analysis/study.py projects/digits/studies/width_schedule.py \
#       --work-dir work_dirs/studies/width_schedule --jobs 2
_digits = 'projects/digits/configs/digits/'
configs = dict(
    compact=_digits + 'yolo-lite_1xb16-900i_digits-det-64x64.py',
    r4=dict(config=_digits + 'expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py',
            cfg_options={'model.init': 'fresh'}))


def _width(scale):
    """The detector's channel settings at ``scale`` times the digits widths."""
    def times(values):
        return [int(v * scale) for v in values]
    return {'backbone.widths': tuple(times((16, 32, 64, 64, 128, 128))),
            'neck.in_channels': times((128, 128, 64)), 'neck.out_channels': times((64, 32, 32)),
            'bbox_head.in_channels': times((64, 32, 32)),
            'bbox_head.out_channels': times((128, 64, 64))}


def _level(scale):
    """Per-config keys: the ExpandNet wraps the detector under model.model."""
    keys = _width(scale)
    return dict(per_config=dict(compact={f'model.{k}': v for k, v in keys.items()},
                                r4={f'model.model.{k}': v for k, v in keys.items()}))


axes = dict(width={'0.25x': _level(0.25), '0.5x': _level(0.5), '1x': {}},
            schedule={'1x': dict(schedule_scale=1), '2x': dict(schedule_scale=2),
                      '4x': dict(schedule_scale=4)})
del _width, _level
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
