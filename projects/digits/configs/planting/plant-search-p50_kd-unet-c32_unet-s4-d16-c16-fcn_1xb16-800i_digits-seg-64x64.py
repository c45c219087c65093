# Channel planting as an architecture search (Mitsuno et al., ICPR 2020) on the
# compact digits U-Net (with its FCN head), distilled from the U-Net of twice
# its width, stopping at half of the stock segmenter's parameters.
#
# Every conv unit of the U-Net and the head starts with a quarter of its output
# channels (the skip connections are concatenations: each unit can grow on its
# own). The narrow network trains alone for 300 iterations (as in the paper, the
# initial network is trained before anything is planted); then, every 50
# iterations, the units are ranked on 64 training images held out by the hook
# (not the validation set) by the first-order gain of the held-out loss
# (cross-entropy + KD) per added parameter; the best three gain a quarter of
# their width, old weights frozen. In the work dir: planting_search.json / .png
# and planted_subnet.py + planted_subnet.pth (never-planted channels removed;
# they load strictly through mmseg.apis.init_model).
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/unet-s4-d16-c32_fcn_1xb16-800i_digits-seg-64x64.py
# then:
#   python tools/train.py projects/digits/configs/planting/plant-search-p50_kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
#   python tools/test.py WORK_DIR/planted_subnet.py WORK_DIR/planted_subnet.pth
_base_ = '../distill/kd-unet-c32_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'

custom_hooks = [
    dict(
        type='ChannelPlantingSearchHook',
        include=['backbone.*', 'decode_head.*'],
        start_fraction=0.25,
        step_fraction=0.25,
        begin=300,
        interval=50,
        units_per_step=3,
        budget=dict(params=0.5),
        probe='taylor',
        heldout=dict(num_samples=64, seed=0, batch_size=16)),
]
