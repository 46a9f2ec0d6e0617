"""AnyNet and RegNet networks ("Designing Network Design Spaces", Radosavovic et al., CVPR 2020,
arXiv 2003.13678), built from an :class:`~tricks_regnet.config.AnyNetConfig`.

An AnyNet is a stem, a body of stages and a head:

* **stem**: one 3x3 convolution (``stem_width`` channels, 32 in the paper) + BN + ReLU;
* **stage i**: ``depths[i]`` residual blocks of width ``widths[i]``; its first block changes the
  width and halves the resolution (stride 2), the others keep both;
* **head**: global average pooling and a fully connected classifier.

Every block is the paper's X block - a bottleneck with a group convolution - or, with
squeeze-excitation, its Y block:

* 1x1 conv (``w_in -> inner``) + BN + ReLU, ``inner = w / b``;
* 3x3 group conv (``inner / g`` groups of ``g`` channels, the block's stride) + BN + ReLU;
* Y only: squeeze-excitation on the ``inner`` channels - global average pool, 1x1 conv to
  ``w_se = round(se * w_in)`` channels (``w_in`` the block's input width), ReLU, 1x1 conv back
  to ``inner``, sigmoid, and a channel-wise product with its input;
* 1x1 conv (``inner -> w_out``) + BN, no ReLU;
* the shortcut: the identity when width and resolution are kept, else a 1x1 conv with the
  block's stride + BN; a ReLU after the sum.

Convolutions have no bias, except the two of the squeeze-excitation.

**Two stems.** ``stem="imagenet"`` is the paper's network: the stem has stride 2 and every stage
halves the resolution, so 224x224 ends at 7x7 (a total stride of 32). ``stem="cifar"`` is this
project's adaptation to 32x32 inputs (not in the paper): the stem and the first stage keep the
resolution (stride 1) and the other three stages halve it, so 32x32 ends at 4x4 (a total stride
of 8), as the CIFAR ResNets do. The layers and parameters are the same; only two strides change.

**Initialization** follows the paper's code: every convolution's weight is drawn from
``N(0, 2 / fan_out)`` with ``fan_out = k * k * out_channels`` (the group count is not divided
out), BN weights are 1 and biases 0, the classifier's weight is drawn from ``N(0, 0.01^2)`` and
its bias is 0; the squeeze-excitation biases keep PyTorch's default. The last BN of each block
is *not* zeroed (the paper's default); :meth:`AnyNetBlock.zero_init_last` does it, and the
``zero_gamma`` plugin calls it.

The blocks use the attribute names of the project's ResNets (``conv1``, ``bn1``, ``conv2``,
``bn2``, ``conv3``, ``bn3``, ``shortcut`` with ``None`` for the identity) and the model keeps its
stages in ``stages``, so model surgery that knows those ResNets (``dropblock``, ``zero_gamma``)
finds the blocks and the stages of these networks too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .complexity import STEMS, Complexity, complexity, se_width, stage_strides
from .config import AnyNetConfig

__all__ = ["SqueezeExcite", "AnyNetBlock", "Stem", "AnyNet", "build_anynet", "create_regnet", "init_weights",
           "stem_stride"]


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``.

    ``fc1`` and ``fc2`` are 1x1 convolutions with bias (``channels -> w_se -> channels``).
    """

    def __init__(self, channels: int, w_se: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, w_se, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(w_se, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class AnyNetBlock(nn.Module):
    """The X block (``w_se = 0``) or Y block (``w_se > 0``) of the paper; see the module docstring.

    ``inner`` is the bottleneck width (``w_out / b``) and must be a multiple of ``group_width``.
    """

    def __init__(self, w_in: int, w_out: int, stride: int, inner: int, group_width: int, w_se: int = 0):
        super().__init__()
        if inner % group_width:
            raise ValueError(f"the inner width {inner} is not a multiple of the group width {group_width}")
        self.conv1 = nn.Conv2d(w_in, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=inner // group_width, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.se = SqueezeExcite(inner, w_se) if w_se > 0 else None
        self.conv3 = nn.Conv2d(inner, w_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w_out)
        if w_in != w_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))
        else:
            self.shortcut = None
        self.relu = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        """Set gamma of the branch's last BN to 0: the block then starts as its shortcut."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def stem_stride(stem: str) -> int:
    """2 for the paper's ``imagenet`` stem, 1 for the ``cifar`` adaptation."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    return 2 if stem == "imagenet" else 1


class Stem(nn.Module):
    """3x3 conv (``in_chans -> width``, ``stride``) + BN + ReLU."""

    def __init__(self, in_chans: int, width: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The paper's code's initialization of one module (apply it with ``model.apply``)."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, nn.Linear):
        module.weight.normal_(0.0, 0.01)
        module.bias.zero_()


class AnyNet(nn.Module):
    """``stem -> stages -> pool -> fc`` for an :class:`AnyNetConfig`.

    ``stem`` is ``"imagenet"`` (the paper's network: stem and every stage of stride 2) or
    ``"cifar"`` (stem and first stage of stride 1, for 32x32 inputs).
    """

    def __init__(self, cfg: AnyNetConfig, num_classes: int = 1000, in_chans: int = 3, stem: str = "imagenet"):
        super().__init__()
        self.cfg, self.stem_kind = cfg, stem
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = Stem(in_chans, cfg.stem_width, stem_stride(stem))
        w_in, stages = cfg.stem_width, []
        strides = stage_strides(len(cfg.depths), stem)
        for depth, w, inner, g, stride in zip(cfg.depths, cfg.widths, cfg.inner_widths, cfg.groups, strides):
            blocks = []
            for i in range(depth):
                blocks.append(AnyNetBlock(w_in, w, stride if i == 0 else 1, inner, g, int(se_width(cfg.se, w_in))))
                w_in = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_in, num_classes)
        self.num_features = w_in
        self.apply(init_weights)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps after the stem and after every stage."""
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))

    def complexity(self, resolution: int = 224) -> Complexity:
        """Flops, parameters and activations at ``resolution`` x ``resolution``, counted analytically."""
        return complexity(self.cfg, resolution, self.stem_kind, self.num_classes, self.in_chans)

    def extra_repr(self) -> str:
        return f"stem={self.stem_kind!r}, depths={list(self.cfg.depths)}, widths={list(self.cfg.widths)}"


def build_anynet(cfg: AnyNetConfig, num_classes: int = 1000, in_chans: int = 3, stem: str = "imagenet") -> AnyNet:
    """The :class:`AnyNet` of ``cfg`` (a function, for symmetry with :func:`create_regnet`)."""
    return AnyNet(cfg, num_classes, in_chans, stem)


def create_regnet(name: str, num_classes: int = 1000, in_chans: int = 3, stem: str = "imagenet") -> AnyNet:
    """A RegNet of the zoo by name (``regnetx_200mf``, ``regnety_1.6gf``, ``regnetx_1600mf``, ...)."""
    from .zoo import zoo_config

    return AnyNet(zoo_config(name), num_classes, in_chans, stem)
