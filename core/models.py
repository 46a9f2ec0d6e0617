"""The core's models: CIFAR-style ResNets for small inputs, and any timm model by name.

* ``resnet{6n+2}`` (resnet8, 14, 20, 32, 44, 56, 110): He et al. 2016, section 4.2 - a 3x3 stem
  of 16 channels, three stages of n basic blocks with 16/32/64 channels, strides 1/2/2, global
  average pooling, a linear head. Shortcuts that change shape are 1x1 convolutions with
  BatchNorm (the paper's option B; its CIFAR table used zero-padding, option A).
* ``resnet18``, ``resnet34``, ``resnet50``: the ImageNet ResNets' stages (64-512 channels,
  basic or bottleneck blocks) behind a 3x3 stride-1 stem without max-pooling, the usual
  adaptation to 32x32 inputs.
* ``timm:NAME``: ``timm.create_model(NAME, num_classes=..., in_chans=...)``, untrained.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .errors import TricksError


def projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The shortcut of a block: identity (``None``) unless the shape changes, then 1x1 conv + BN."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A ResNet for small inputs: ``stem -> stages -> pool -> fc``."""

    def __init__(self, block, depths, widths, num_classes=10, in_chans=3, stem_width=None):
        super().__init__()
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        c_in, stages = stem_width, []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def cifar_resnet(depth: int, num_classes=10, in_chans=3) -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers."""
    if (depth - 2) % 6 or depth < 8:
        raise TricksError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_chans)


MODELS = {
    **{f"resnet{d}": (lambda d: lambda k, c: cifar_resnet(d, k, c))(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet18": lambda k, c: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], k, c),
    "resnet34": lambda k, c: ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], k, c),
    "resnet50": lambda k, c: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], k, c),
}


def create_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """A model of the core by name, or ``timm:NAME`` for any timm model (untrained)."""
    if name.startswith("timm:"):
        import timm

        arch = name[5:]
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else "see timm.list_models()"
            raise TricksError(f"timm has no model '{arch}': {hint}")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3)
        if _is_timm_model(name):
            close.insert(0, "timm:" + name)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        if name[:6] == "resnet" and name[6:].isdigit():
            hint = "CIFAR ResNets have depth 6n+2 (8, 14, 20, 32, 44, 56, 110), the ImageNet-style ones 18, 34, 50; " + hint
        raise TricksError(f"unknown model '{name}': {hint}choose one of {', '.join(MODELS)} or timm:NAME")
    return MODELS[name](num_classes, in_chans)


def _is_timm_model(name: str) -> bool:
    """Whether ``name`` is a timm model (so the user may have left off ``timm:``)."""
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def complexity(model: nn.Module, in_chans: int, image_size: int) -> dict[str, int]:
    """``{"params", "macs"}`` of ``model``: its parameter count, and the multiply-accumulates of
    a forward pass of one ``in_chans`` x ``image_size`` x ``image_size`` image (half the FLOPs
    torch's ``FlopCounterMode`` counts), in eval mode, without gradients, on the model's device.
    The model's mode and the global random state are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(1, in_chans, image_size, image_size, device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": params, "macs": counter.get_total_flops() // 2}
