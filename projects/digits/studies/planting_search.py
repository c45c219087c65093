# Channel planting as a search against the same detector uniformly narrowed to the same
# parameter count (half, or a quarter, of the stock digits detector's), both distilled from
# the twice-wider detector for the same 900 iterations on the same training images; three
# seeds; and ChannelPlantingHook's uniform planting (four stages back to the stock width,
# old weights frozen) for reference. (The stock detector distilled the same way is in
# projects/digits/studies/acceptance_grid.py, kd_compact.)
# Train the teacher first (see the planting configs), then:
#   python tools/analysis/study.py projects/digits/studies/planting_search.py \
#       --work-dir work_dirs/studies/planting_search
_configs = 'projects/digits/configs/planting/'
configs = dict(
    searched_p50=_configs + 'plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
    uniform_p50=_configs + 'plant-uniform-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
    # The same search with nothing frozen: every planted channel keeps training.
    searched_p50_unfrozen=dict(
        config=_configs + 'plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
        cfg_options={'custom_hooks.0.freeze': 'none'}),
    searched_p25=dict(
        config=_configs + 'plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
        cfg_options={'custom_hooks.0.budget.params': 0.25}),
    # 43% of every unit's channels: 24.8% of the stock parameters, the searched network's size.
    uniform_p25=dict(
        config=_configs + 'plant-uniform-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py',
        cfg_options={'custom_hooks.0.start_fraction': 0.43}),
    uniform_planting_4_stages=_configs + 'plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py')
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
