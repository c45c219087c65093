# Issue 25: do the narrow U-Nets still lose with expansion under the default orthogonal
# factors? width_schedule_seg.py's 2x- and 4x-schedule columns with the r=4 entry's
# init='orthogonal' (its compact runs are the same as that study's):
#   python tools/analysis/study.py projects/digits/studies/width_schedule_seg_orthogonal.py \
#       --work-dir work_dirs/studies/width_schedule_seg_orthogonal --jobs 2
_base_ = './width_schedule_seg.py'
configs = dict(r4=dict(cfg_options={'model.init': 'orthogonal'}))
axes = dict(schedule=dict(_delete_=True, **{'2x': dict(schedule_scale=2),
                                            '4x': dict(schedule_scale=4)}))
