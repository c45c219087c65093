# Compact U-Net (the ExpandNets paper's segmentation setting): mmseg's
# UNet-S5-D16 + FCN head on Cityscapes, with 16 instead of 64 base channels
# (about 1/16 of the parameters). Everything else -- data, schedule, losses,
# SyncBN -- is the stock config.
_base_ = 'mmseg::unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py'

base_channels = 16
model = dict(
    backbone=dict(base_channels=base_channels),
    # The heads read the last decoder stage (in_index=4: base_channels) and the
    # one before it (in_index=3: 2 * base_channels); their hidden width shrinks
    # with the backbone so the head does not dominate the compact model.
    decode_head=dict(in_channels=base_channels, channels=base_channels),
    auxiliary_head=dict(in_channels=2 * base_channels, channels=base_channels))
