# Channel planting as a search against the same detector uniformly narrowed to the same
# parameter count (half of the stock digits detector's), both distilled from the twice-wider
# detector for the same 900 iterations on the same training images; three seeds.
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
        cfg_options={'custom_hooks.0.freeze': 'none'}))
seeds = [0, 1, 2]
metric = 'coco/bbox_mAP'
metric_scale = 100
