"""Hand-built compact layers and their expansions, shared by the factor-rate tests."""
from torch import nn

from expand_mm import ExpandConv2d, ExpandLinear


def kaiming_conv(channels, kernel, groups=1):
    """A square conv initialised as mmcv's ConvModule initialises its conv."""
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups)
    nn.init.kaiming_normal_(conv.weight, mode='fan_out')  # mmcv ConvModule's init
    return conv


# name -> (compact layer of c channels, its expansion (keep_weights=...), input shape).
LAYERS = {
    'cl-3x3': (lambda c: kaiming_conv(c, 3), lambda m, keep: ExpandConv2d.from_conv(
        m, 'cl', 4, keep_weights=keep), lambda c: (4, c, 12, 12)),
    'ck-5x5': (lambda c: kaiming_conv(c, 5), lambda m, keep: ExpandConv2d.from_conv(
        m, 'ck', 4, keep_weights=keep), lambda c: (4, c, 12, 12)),
    'depthwise': (lambda c: kaiming_conv(c, 3, groups=c), lambda m, keep: ExpandConv2d.from_conv(
        m, 'cl', 4, keep_weights=keep), lambda c: (4, c, 12, 12)),
    'linear': (lambda c: nn.Linear(c, c), lambda m, keep: ExpandLinear.from_linear(
        m, 4, keep_weights=keep), lambda c: (32, c)),
}
