"""ResNet-A/B/C/D from "Bag of Tricks for Image Classification with Convolutional Neural
Networks" (He, Zhang, Zhang, Zhang, Xie, Li, CVPR 2019, arXiv 1812.01187), section 4.

:func:`create_resnet` builds a tweaked ResNet by depth, variant and shape, usable without the
framework; :class:`ResNetTweaks` provides it as the run's model, chosen from the core's
``--model`` name (``resnet20``, ``resnet50``, ``resnet101``, ...).
"""

from __future__ import annotations

from typing import Literal

import tricks

from .models import BasicBlock, Bottleneck, TweakedResNet, make_shortcut

__version__ = "0.1.0"
__all__ = ["create_resnet", "resolve_architecture", "TweakedResNet", "BasicBlock", "Bottleneck",
           "make_shortcut", "ResNetTweaks", "ResNetTweaksSettings", "CIFAR_DEPTHS", "IMAGENET_DEPTHS",
           "AUTO_IMAGENET_MIN_SIZE"]

# He et al. 2016: the CIFAR ResNets of depth 6n + 2 (three stages of n basic blocks, 16/32/64 wide).
CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
# The ImageNet ResNets: block type and blocks per stage (widths 64, 128, 256, 512).
IMAGENET_DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
# stem="auto": inputs at least this large get the ImageNet stem (stride 4), smaller ones the CIFAR stem.
AUTO_IMAGENET_MIN_SIZE = 128

SUPPORTED = ", ".join(f"resnet{d}" for d in (*CIFAR_DEPTHS, *IMAGENET_DEPTHS))


def _depth(model: str) -> int | None:
    if model.startswith("resnet") and model[6:].isdigit():
        depth = int(model[6:])
        if depth in CIFAR_DEPTHS or depth in IMAGENET_DEPTHS:
            return depth
    return None


def resolve_architecture(model: str, stem: str = "auto", image_size: int = 224) -> tuple[int, str]:
    """``(depth, shape)`` for a model name and a ``stem`` setting; ``shape`` is ``imagenet`` or ``cifar``.

    ``auto`` picks the ImageNet shape for resnet18/34/50/101/152 when ``image_size >= 128``
    and the CIFAR shape otherwise; the 6n+2 depths exist in the CIFAR shape only.
    """
    depth = _depth(model)
    if depth is None:
        raise tricks.TricksError(
            f"resnet_tweaks cannot build model '{model}': it builds {SUPPORTED}; "
            "choose one with --model, or leave resnet_tweaks out")
    if depth in CIFAR_DEPTHS:
        if stem == "imagenet":
            raise tricks.TricksError(
                f"resnet_tweaks: {model} is a CIFAR ResNet (depth 6n+2) and has no ImageNet shape; "
                "use --set resnet_tweaks.stem=cifar (or auto), or a model among resnet18/34/50/101/152")
        return depth, "cifar"
    if stem == "auto":
        return depth, "imagenet" if image_size >= AUTO_IMAGENET_MIN_SIZE else "cifar"
    return depth, stem


def create_resnet(depth: int, variant: str = "D", shape: str = "imagenet", num_classes: int = 1000,
                  in_chans: int = 3) -> TweakedResNet:
    """ResNet-``depth``-``variant`` in the ImageNet shape (depths 18, 34, 50, 101, 152) or the
    CIFAR shape (those, with the stem of stride 1, or the 6n+2 depths 8 ... 110)."""
    if depth in CIFAR_DEPTHS:
        if shape != "cifar":
            raise ValueError(f"depth {depth} is a CIFAR ResNet: shape must be 'cifar'")
        n = (depth - 2) // 6
        return TweakedResNet(BasicBlock, [n, n, n], [16, 32, 64], variant, shape, num_classes, in_chans)
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"no ResNet of depth {depth}: choose among {CIFAR_DEPTHS} or {tuple(IMAGENET_DEPTHS)}")
    block, depths = IMAGENET_DEPTHS[depth]
    return TweakedResNet(block, depths, [64, 128, 256, 512], variant, shape, num_classes, in_chans)


class ResNetTweaksSettings(tricks.Settings):
    variant: Literal["A", "B", "C", "D"] = tricks.Field(
        "D", description="A: original; B: stride on the 3x3; C: B + three-3x3 stem; D: C + avg-pool shortcut")
    stem: Literal["auto", "imagenet", "cifar"] = tricks.Field(
        "auto", description=f"network shape: imagenet (stem of stride 4, max-pool), cifar (stride 1), or auto "
                            f"(imagenet for resnet18-152 when the image side is >= {AUTO_IMAGENET_MIN_SIZE})")


class ResNetTweaks(tricks.Plugin):
    """Provide the run's ResNet as ResNet-A, -B, -C or -D (Bag of Tricks, section 4)."""

    Settings = ResNetTweaksSettings

    @tricks.hookimpl
    def build_model(self, ctx):
        if _depth(ctx.core.model) is None:
            return None  # not a ResNet name: the next provider's (the core refuses a run that named this plugin)
        s = self.settings
        depth, shape = resolve_architecture(ctx.core.model, s.stem, ctx.image_size)
        model = create_resnet(depth, s.variant, shape, ctx.num_classes, ctx.in_chans)
        params = sum(p.numel() for p in model.parameters())
        ctx.log(f"resnet_tweaks: ResNet-{depth}-{s.variant}, {shape}-shaped, {params / 1e6:.2f}M parameters")
        return model
