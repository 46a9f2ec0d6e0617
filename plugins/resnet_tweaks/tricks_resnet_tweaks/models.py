"""ResNet-A, -B, -C and -D (He et al., "Bag of Tricks for Image Classification with
Convolutional Neural Networks", arXiv 1812.01187, section 4), ImageNet-shaped or CIFAR-shaped.

* **A** is the original ResNet: in a downsampling bottleneck the stride sits on the first 1x1
  convolution, the stem is a 7x7 stride-2 convolution (ImageNet) or one 3x3 (CIFAR), and a
  shortcut that changes shape is a strided 1x1 convolution + BN.
* **B** moves the stride to the 3x3 convolution, so the 1x1 no longer skips three quarters of
  its input. A basic block has no 1x1 in its branch: its stride already sits on a 3x3, B = A.
* **C** is B with the stem replaced by three 3x3 convolutions (ImageNet: 32, 32, 64 channels, the
  first with stride 2; CIFAR: w/2, w/2, w for a stem of width w, all stride 1).
* **D** is C with the shortcut of a downsampling block made a 2x2 average pool (stride 2,
  ``ceil_mode``, ``count_include_pad=False``) followed by a stride-1 1x1 convolution + BN.

The blocks keep the attribute names of the project's ResNets (``conv1``, ``bn1``, ...,
``shortcut``, ``None`` for the identity) and offer ``zero_init_last()``, so model surgery that
knows those ResNets or timm's protocol knows these too.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride, bias=False)


def make_shortcut(c_in: int, c_out: int, stride: int, avg_down: bool) -> nn.Module | None:
    """The shortcut of a block: ``None`` (identity) when the shape is kept; else a strided 1x1
    convolution + BN (A, B, C) or, with ``avg_down`` and a stride (D), a 2x2 average pool with
    ``ceil_mode`` and ``count_include_pad=False``, then a stride-1 1x1 convolution + BN."""
    if stride == 1 and c_in == c_out:
        return None
    if avg_down and stride > 1:
        return nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                             _conv1x1(c_in, c_out), nn.BatchNorm2d(c_out))
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the stride is on the first (so ResNet-B changes nothing here)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, stride_on_3x3: bool = True, avg_down: bool = False):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = make_shortcut(c_in, c_out, stride, avg_down)

    def zero_init_last(self) -> None:
        """Set gamma of the residual branch's last BN to 0 (the block starts as the identity)."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels); the stride on the 3x3 (B, C, D) or the first 1x1 (A)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, stride_on_3x3: bool = True, avg_down: bool = False):
        super().__init__()
        c_out = width * self.expansion
        s1, s3 = (1, stride) if stride_on_3x3 else (stride, 1)
        self.conv1 = _conv1x1(c_in, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, s3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = make_shortcut(c_in, c_out, stride, avg_down)

    def zero_init_last(self) -> None:
        """Set gamma of the residual branch's last BN to 0 (the block starts as the identity)."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [_conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def imagenet_stem(in_chans: int, deep: bool, width: int = 64) -> nn.Sequential:
    """7x7 stride-2 conv (A, B) or three 3x3 convs of width/2, width/2, width, the first strided
    (C, D); BN + ReLU after each; then a 3x3 stride-2 max-pool: a quarter of the input side."""
    if deep:
        layers = (_conv_bn_relu(in_chans, width // 2, 2) + _conv_bn_relu(width // 2, width // 2)
                  + _conv_bn_relu(width // 2, width))
    else:
        layers = [nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(3, 2, 1))


def cifar_stem(in_chans: int, deep: bool, width: int) -> nn.Sequential:
    """One 3x3 stride-1 conv (A, B: the project's CIFAR stem) or three 3x3 stride-1 convs of
    width/2, width/2, width (C, D); BN + ReLU after each; no pooling: the input side is kept."""
    if deep:
        return nn.Sequential(*_conv_bn_relu(in_chans, width // 2), *_conv_bn_relu(width // 2, width // 2),
                             *_conv_bn_relu(width // 2, width))
    return nn.Sequential(*_conv_bn_relu(in_chans, width))


class TweakedResNet(nn.Module):
    """``stem -> stages -> pool -> fc``; the first block of every stage but the first has stride 2.

    ``variant`` is ``"A"``, ``"B"``, ``"C"`` or ``"D"``; ``shape`` is ``"imagenet"`` (stem of
    stride 4) or ``"cifar"`` (stem of stride 1).
    """

    def __init__(self, block: type[nn.Module], depths: list[int], widths: list[int], variant: str = "D",
                 shape: str = "imagenet", num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        if variant not in ("A", "B", "C", "D"):
            raise ValueError(f"variant must be A, B, C or D, got {variant!r}")
        if shape not in ("imagenet", "cifar"):
            raise ValueError(f"shape must be imagenet or cifar, got {shape!r}")
        self.variant, self.shape = variant, shape
        stride_on_3x3 = variant != "A"
        deep_stem = variant in ("C", "D")
        avg_down = variant == "D"
        stem_width = 64 if shape == "imagenet" else widths[0]
        self.stem = imagenet_stem(in_chans, deep_stem, stem_width) if shape == "imagenet" else cifar_stem(
            in_chans, deep_stem, stem_width)
        c_in, stages = stem_width, []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(c_in, width, stride, stride_on_3x3=stride_on_3x3, avg_down=avg_down))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps after the stem and after every stage."""
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return outs

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
