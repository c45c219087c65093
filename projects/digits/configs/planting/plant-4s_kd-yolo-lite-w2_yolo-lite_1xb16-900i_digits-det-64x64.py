# Channel planting (Mitsuno et al., ICPR 2020) of the compact digits
# YOLO-LITE-style detector, with distillation from a trained detector of twice
# its width.
#
# The student is the stock compact detector of
# ../digits/yolo-lite_1xb16-900i_digits-det-64x64.py. Its backbone and neck
# units start with a quarter of their output channels planted (the rest are
# masked to zero: the network computes what the narrow one would); at
# iterations 225, 450 and 675 another quarter is planted, without changing
# what the network computes at that moment, and every weight entry that existed
# before is frozen -- only the new channels' filters, norms and the new input
# columns of their readers train, by the labels and by the teacher. Channels
# not planted yet keep their initial values until they are. The last stage is
# the full stock model: iter_900_compact.pth (the student alone, written beside
# each checkpoint) loads strictly into the compact config. iter_900.pth itself
# does not: it is the Distiller's checkpoint (the student's keys under
# 'student.', plus the teacher and the adapters).
#
# Train the teacher first (from the repository root):
#   python tools/train.py projects/digits/configs/distill/yolo-lite-w2_1xb16-900i_digits-det-64x64.py
# then:
#   python tools/train.py projects/digits/configs/planting/plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py
#   python tools/test.py projects/digits/configs/digits/yolo-lite_1xb16-900i_digits-det-64x64.py \
#       work_dirs/plant-4s_kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64/iter_900_compact.pth
_base_ = '../distill/kd-yolo-lite-w2_yolo-lite_1xb16-900i_digits-det-64x64.py'

stage_iters = 225  # 900 iterations, four stages of the base's schedule (warm-up + cosine)

# The base's default_hooks are inherited: load_from= a student (compact) checkpoint
# loads strictly into the student (expand_load), and iter_N_compact.pth is the student
# alone (expand_contract; teacher and adapters dropped), before the last stage the
# narrower network of the stage (unplanted channels zeroed).
custom_hooks = [
    dict(
        type='ChannelPlantingHook',
        include=['backbone.*', 'neck.*'],
        stages=(0.25, 0.5, 0.75, 1.0),
        milestones=[stage_iters, 2 * stage_iters, 3 * stage_iters],
        freeze='all'),
]
