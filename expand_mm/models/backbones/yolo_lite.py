"""``type='YOLOLite'``: the plain conv stack of YOLO-LITE as an OpenMMLab backbone."""
from __future__ import annotations

from typing import Sequence

import torch
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import nn


from ...errors import ConfigError
@MODELS.register_module()
class YOLOLite(BaseModule):
    """YOLO-LITE-style backbone: a plain stack of conv-BN-LeakyReLU layers.

    YOLO-LITE (Pedoeem & Huang, 2018, "YOLO-LITE: A Real-Time Object Detection
    Algorithm Optimized for Non-GPU Computers") is a seven-layer Tiny-YOLO
    derivative: six 3×3 conv layers of widths 16-32-64-128-128-256, each
    followed by batch norm and LeakyReLU(0.1), with a 2×2 stride-2 max-pool
    between consecutive convs, then a 1×1 detection conv (here: the
    ``YOLOV3Neck`` / ``YOLOV3Head`` of the config). There are no residual,
    depthwise or 1×1 layers in the backbone, so every conv is a k×k that
    ExpandNet-CL (and, with ``kernel_size=5``, ExpandNet-CK) can expand.

    Stage ``i`` is ``[MaxPool2d(2, 2)] + ConvModule(k×k, stride 1)`` (stage 0
    has no pool), so its output has stride ``2**i`` w.r.t. the input. With the
    default six widths the stages output::

        stage   0    1    2    3    4    5
        stride  1    2    4    8   16   32
        width  16   32   64  128  128  256

    and the default ``out_indices=(3, 4, 5)`` gives the stride-8/16/32 maps
    (128, 128, 256 channels) that a three-scale ``YOLOV3Neck`` expects, listed
    shallow to deep (the neck's ``in_channels`` are listed deep to shallow:
    ``[256, 128, 128]``). Each conv is an mmcv ``ConvModule`` whose ``.conv``
    is a plain ``nn.Conv2d`` (no bias when a norm follows), which is exactly
    the child that ``expand_mm``'s surgery replaces.

    Args:
        in_channels: Channels of the input image.
        widths: Output channels of each stage (one conv per stage).
        kernel_size: Odd kernel size of every conv, or one per stage.
            ``padding = kernel_size // 2`` keeps the spatial size; only the
            max-pools downsample.
        out_indices: Stages whose outputs are returned, in increasing order.
        norm_cfg: Norm layer config of every ``ConvModule``.
        act_cfg: Activation config of every ``ConvModule`` (YOLO-LITE:
            LeakyReLU with slope 0.1).
        init_cfg: MMEngine initialisation config. ``None`` keeps mmcv's
            ``ConvModule`` default (Kaiming for the conv, matched to the
            LeakyReLU slope; constant 1/0 for the norm).

    Example:
        >>> import torch
        >>> from expand_mm.models.backbones import YOLOLite
        >>> net = YOLOLite().eval()
        >>> [tuple(o.shape) for o in net(torch.rand(1, 3, 224, 224))]
        [(1, 128, 28, 28), (1, 128, 14, 14), (1, 256, 7, 7)]
    """

    def __init__(self,
                 in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64, 128, 128, 256),
                 kernel_size: int | Sequence[int] = 3,
                 out_indices: Sequence[int] = (3, 4, 5),
                 norm_cfg: dict | None = dict(type='BN'),
                 act_cfg: dict | None = dict(type='LeakyReLU', negative_slope=0.1),
                 init_cfg: dict | list[dict] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        widths = tuple(widths)
        if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ConfigError(f'YOLOLite: widths={widths!r} must be a non-empty sequence '
                              'of positive ints, e.g. (16, 32, 64, 128, 128, 256)')
        kernel_sizes = ((kernel_size,) * len(widths) if isinstance(kernel_size, int)
                        else tuple(kernel_size))
        if len(kernel_sizes) != len(widths):
            raise ConfigError(f'YOLOLite: kernel_size={kernel_size!r} has {len(kernel_sizes)} '
                              f'entries but widths has {len(widths)}; give one int or one '
                              'odd kernel size per stage')
        if not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in kernel_sizes):
            raise ConfigError(f'YOLOLite: kernel_size={kernel_size!r} must be odd positive '
                              'ints (1, 3, 5, ...) so that padding k // 2 keeps the size')
        out_indices = tuple(out_indices)
        if (not out_indices or list(out_indices) != sorted(set(out_indices))
                or not all(0 <= i < len(widths) for i in out_indices)):
            raise ConfigError(f'YOLOLite: out_indices={out_indices!r} must be increasing '
                              f'stage indices in [0, {len(widths) - 1}]')

        self.in_channels = in_channels
        self.widths = widths
        self.kernel_sizes = kernel_sizes
        self.out_indices = out_indices
        self.stages = nn.ModuleList()
        channels = in_channels
        for i, (width, k) in enumerate(zip(widths, kernel_sizes)):
            stage = nn.Sequential()
            if i > 0:
                stage.add_module('pool', nn.MaxPool2d(kernel_size=2, stride=2))
            stage.add_module('conv', ConvModule(channels, width, k, padding=k // 2,
                                                norm_cfg=norm_cfg, act_cfg=act_cfg))
            self.stages.append(stage)
            channels = width

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the returned feature maps (in ``out_indices`` order)."""
        return tuple(self.widths[i] for i in self.out_indices)

    @property
    def out_strides(self) -> tuple[int, ...]:
        """Strides of the returned feature maps w.r.t. the input."""
        return tuple(2**i for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the stages; return the outputs of ``out_indices`` (shallow first).

        Args:
            x: Images, shape ``(N, in_channels, H, W)``; ``H`` and ``W`` should
                be multiples of ``2**out_indices[-1]`` (32 by default) so the
                max-pools do not drop border rows.

        Returns:
            One tensor per entry of ``out_indices``, stage ``i`` of shape
            ``(N, widths[i], H // 2**i, W // 2**i)``.
        """
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
