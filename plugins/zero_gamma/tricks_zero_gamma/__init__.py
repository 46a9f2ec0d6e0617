"""Zero-gamma initialization ("Bag of Tricks for Image Classification with Convolutional Neural
Networks", He et al., CVPR 2019, arXiv 1812.01187, section 3.1).

Set gamma (the weight) of the last BatchNorm of every residual block's residual branch to 0:
the branch then outputs its BN's beta, 0 at initialization, and every block starts as its
shortcut - the identity for blocks that keep the shape. :func:`zero_gamma` does it to any model
whose residual blocks it recognises; :class:`ZeroGamma` applies it to the run's model.

Which modules are residual blocks, and which norm layer ends their branch, is the core's block
protocol, :mod:`tricks.blocks` (shared with ``dropblock``): the project's, torchvision's and timm's
ResNets, timm's RegNet, MobileNet/EfficientNet and "bring your own blocks" blocks, any block with
``zero_init_last()`` (the method does the zeroing) and the ResNet structure. Another plugin teaches
it a new block with ``tricks.blocks.register_block_family(BlockFamily("mine", (MyBlock,),
last_norms=lambda b: [b.bn3]))``, or by giving the block a ``zero_init_last()`` method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import tricks
from tricks.blocks import find_blocks, last_norms

__version__ = "0.1.0"
__all__ = ["zero_gamma", "find_residual_blocks", "last_norms", "ResidualBlock", "ZeroGamma", "ZeroGammaSettings"]


@dataclass
class ResidualBlock:
    """A residual block found in a model: its name, the module, and the norms ending its branch."""

    name: str
    module: nn.Module
    norms: list[nn.Module]
    was_zero: bool = False


def find_residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """Every residual block of ``model``, outermost first (a block's inside is not searched)."""
    blocks = find_blocks(model, "last_norms")
    return [ResidualBlock(b.name or type(b.module).__name__, b.module, b.answer) for b in blocks]


@torch.no_grad()
def zero_gamma(model: nn.Module) -> list[ResidualBlock]:
    """Set to 0 the gamma of the last norm of every residual block's branch of ``model`` (in place)
    and return the blocks; blocks with ``zero_init_last()`` do it themselves. Raises
    ``tricks.TricksError`` when the model has no residual block."""
    blocks = find_residual_blocks(model)
    if not blocks:
        raise tricks.TricksError(
            f"zero_gamma found no residual block ending in a BatchNorm in {type(model).__name__}: the plugin needs "
            "a residual model (a ResNet or RegNet, e.g. --model resnet20 or timm:resnet50); leave zero_gamma out for this one")
    for block in blocks:
        block.was_zero = all(not n.weight.any() for n in block.norms)
        init = getattr(block.module, "zero_init_last", None)
        if callable(init):
            init()
        for norm in block.norms:  # what zero_init_last should have done; a no-op when it did
            nn.init.zeros_(norm.weight)
    return blocks


class ZeroGammaSettings(tricks.Settings):
    pass


class ZeroGamma(tricks.Plugin):
    """Start every residual block as the identity: gamma = 0 in its branch's last BatchNorm."""

    Settings = ZeroGammaSettings

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        blocks = zero_gamma(model)
        kinds: dict[str, int] = {}
        for block in blocks:
            kinds[type(block.module).__name__] = kinds.get(type(block.module).__name__, 0) + 1
        already = sum(b.was_zero for b in blocks)
        detail = ", ".join(f"{n} x {k}" for k, n in kinds.items())
        note = f"; {already} of them were zero already" if already else ""
        ctx.log(f"zero_gamma: gamma = 0 in the last BatchNorm of {len(blocks)} residual blocks ({detail}){note}")
        return model
