# Channel planting as an architecture search (Mitsuno et al., ICPR 2020) on the
# compact digits YOLO-LITE-style detector, with distillation from a trained
# detector of twice its width, stopping at half of the stock detector's
# parameters.
#
# The backbone and neck units start with a quarter of their output channels
# (the rest masked to zero: the network computes what the narrow one would).
# The narrow network trains alone for 300 iterations (the paper trains the
# initial network before planting; planting during the warm-up would freeze an
# untrained network). Then, every 50 iterations, the candidates (each backbone
# unit, each neck lateral conv, each neck detection block) are ranked on 32
# training images held out by the hook (not the validation set) by the
# first-order gain of the held-out loss (task + distillation) per parameter that
# planting into them adds; the best three gain a quarter of their width, without changing what the
# network computes at that moment, and every weight entry that existed before is
# frozen: only the new channels train, by the labels and by the teacher. The
# search stops before the network would exceed half of the stock detector's
# parameters; training continues to iteration 900 with the widths found.
#
# In the work dir: planting_search.json / .png (held-out loss against
# parameters per step) and the network found, never-planted channels removed:
# planted_subnet.py + planted_subnet.pth, which load strictly through the stock
# mmdet.apis.init_detector. iter_N_compact.pth is the stock-shaped student with
# the unplanted channels zeroed.
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# then:
#   python tools/train.py projects/digits/configs/planting/plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py
#   python tools/test.py work_dirs/plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64/planted_subnet.py \
#       work_dirs/plant-search-p50_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64/planted_subnet.pth
_base_ = '../distill/kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'

custom_hooks = [
    dict(
        type='ChannelPlantingSearchHook',
        include=['backbone.*', 'neck.*'],
        # Each detection block of the neck grows as one candidate (fewer probes per step).
        candidates=[['neck.detect1.*'], ['neck.detect2.*'], ['neck.detect3.*']],
        start_fraction=0.25,
        step_fraction=0.25,
        begin=300,
        interval=50,
        units_per_step=3,
        budget=dict(params=0.5),
        probe='taylor',
        heldout=dict(num_samples=32, seed=0, batch_size=16)),
]
