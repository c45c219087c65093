# The reference for ./plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py:
# the compact digits detector uniformly narrowed to about half of its
# parameters (every backbone and neck unit at 67% of its channels: 50% of the
# stock parameters), trained with the same distillation, the same 900
# iterations and the same 32 held-out training images (so both train on the
# same data); no channel is planted later (budget max_steps=0). Exports its
# narrow network the same way: planted_subnet.py + planted_subnet.pth.
#
#   python tools/train.py projects/digits/configs/planting/plant-uniform-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py
_base_ = './plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'

custom_hooks = [
    dict(
        type='ChannelPlantingSearchHook',
        include=['backbone.*', 'neck.*'],
        start_fraction=0.67,
        interval=450,
        budget=dict(max_steps=0),
        heldout=dict(num_samples=32, seed=0, batch_size=16)),
]
