# ExpandNet-CL of the compact YOLO-LITE-style digits detector, with per-layer ratios
# planned so that a training step is predicted to cost at most 1.10x the compact
# model's time and peak memory, at this config's batch size and input size.
#
# The planner (expand_mm/budget.py) chooses each 3x3 conv's ratio from (1, 2, 4)
# when the model is built and logs the plan; everything else is the r=4 config's.
_base_ = '../digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(
    budget=dict(
        train_step=1.10,
        train_memory=1.10,
        batch_size={{_base_.train_dataloader.batch_size}},
        img_size=(64, 64),  # the Resize scale of the pipeline (img_scale)
        ratios=(1, 2, 4)))
