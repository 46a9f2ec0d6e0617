"""Putting DropBlock layers into a residual network.

As in the paper's official ResNet code, a DropBlock layer goes at the end of each residual
branch (after its last BN, before the addition) and on the shortcut (after the projection's BN,
or on the input itself for an identity shortcut), in every block of the chosen stages; optionally
also after the branch's inner BN layers. Each layer is a child module of its block (so it follows
``train()``/``eval()`` and the device, and has no state: the state dict is unchanged) and runs
on the output of the module it follows through a forward hook, or is the shortcut itself where
the shortcut was the identity.

Which modules are residual blocks, where their sites are, and where a model's stages are, is the
core's block protocol, :mod:`tricks.blocks` (shared with ``zero_gamma``): the project's ResNets,
the tweaked ResNets of ``resnet_tweaks``, the AnyNet/RegNet blocks of ``regnet``, torchvision's and
timm's ResNets and timm's RegNets. A new block is taught there, with
``register_block_family(BlockFamily(..., sites=...))``; a new model's stages with
``register_stage_finder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tricks.blocks import BlockSites, find_blocks, find_stages

from .functional import drop_block


class DropBlock2d(nn.Module):
    """DropBlock on ``[N, C, H, W]`` maps. ``keep_prob`` is the current keep probability (a Python
    float, set by the schedule); ``rate_scale`` scales the drop rate for this layer's stage:
    :meth:`set_keep_prob` sets ``keep_prob = 1 - (1 - p) * rate_scale``."""

    def __init__(self, block_size: int = 7, keep_prob: float = 1.0, rate_scale: float = 1.0):
        super().__init__()
        self.block_size = int(block_size)
        self.keep_prob = float(keep_prob)
        self.rate_scale = float(rate_scale)

    def set_keep_prob(self, keep_prob: float) -> None:
        self.keep_prob = 1.0 - (1.0 - float(keep_prob)) * self.rate_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_block(x, self.keep_prob, self.block_size, self.training)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, keep_prob={self.keep_prob:.4g}, rate_scale={self.rate_scale:.4g}"


class _ThenDrop:
    """A forward hook that passes a module's output through a DropBlock layer (picklable)."""

    def __init__(self, layer: DropBlock2d):
        self.layer = layer

    def __call__(self, module, args, output):
        return self.layer(output)


def residual_blocks(module: nn.Module) -> list[tuple[nn.Module, BlockSites]]:
    """The residual blocks inside ``module`` with their sites, in order (a block's inside is not searched)."""
    return [(found.module, found.answer) for found in find_blocks(module, "sites")]


def _shortcut_drop(block: nn.Module, attr: str, layer: DropBlock2d) -> None:
    shortcut = getattr(block, attr)
    if shortcut is None or isinstance(shortcut, nn.Identity):
        setattr(block, attr, layer)  # the identity becomes DropBlock on the block's input
    else:
        block.add_module(f"dropblock_{attr}", layer)
        shortcut.register_forward_hook(_ThenDrop(layer))


def _after(block: nn.Module, module: nn.Module, name: str, layer: DropBlock2d) -> None:
    block.add_module(name, layer)
    module.register_forward_hook(_ThenDrop(layer))


def insert_into_block(block: nn.Module, sites: BlockSites, block_size: int, rate_scale: float = 1.0,
                      shortcut: bool = True, inner: bool = False) -> list[DropBlock2d]:
    """Put DropBlock layers at the sites of one block; returns them."""
    layers = []

    def new():
        layer = DropBlock2d(block_size, 1.0, rate_scale)
        layers.append(layer)
        return layer

    if inner:
        for i, module in enumerate(sites.inner, 1):
            _after(block, module, f"dropblock_inner{i}", new())
    _after(block, sites.branch_end, "dropblock_branch", new())
    if shortcut:
        _shortcut_drop(block, sites.shortcut_attr, new())
    return layers


@dataclass
class Insertion:
    """What :func:`insert_dropblock` did: the layers, and per chosen stage its number (1-based),
    blocks and drop-rate scale."""

    layers: list[DropBlock2d]
    stages: list[tuple[int, int, float]]  # (stage, blocks, rate_scale)
    num_stages: int


class SurgeryError(ValueError):
    """The model cannot take DropBlock as asked (no stages found, a stage out of range, ...)."""


def insert_dropblock(model: nn.Module, block_size: int = 7, stages: list[int] | tuple[int, ...] = (-2, -1),
                     scale_per_stage: bool = True, shortcut: bool = True, inner: bool = False) -> Insertion:
    """Insert DropBlock layers (``keep_prob`` 1 until set) into every residual block of the chosen
    ``stages`` of ``model``, in place. Stages count from 1; negative numbers from the end (-1 is
    the last). With ``scale_per_stage``, stage ``g`` of ``L`` gets ``rate_scale = 4**-(L - g)``."""
    all_stages = find_stages(model)
    if not all_stages:
        raise SurgeryError(f"cannot find the stages of {type(model).__name__} (no 'stages', 'layer1...' or 's1...')")
    n = len(all_stages)
    chosen = []
    for s in stages:
        g = s if s > 0 else n + 1 + s
        if s == 0 or not 1 <= g <= n:
            raise SurgeryError(f"{type(model).__name__} has {n} stages; stage {s} does not exist "
                               f"(choose among 1..{n}, or -1..-{n} from the end)")
        if g not in chosen:
            chosen.append(g)
    layers, report = [], []
    for g in sorted(chosen):
        scale = 4.0 ** -(n - g) if scale_per_stage else 1.0
        blocks = residual_blocks(all_stages[g - 1])
        for block, sites in blocks:
            layers += insert_into_block(block, sites, block_size, scale, shortcut, inner)
        report.append((g, len(blocks), scale))
    if not layers:
        raise SurgeryError(f"found no residual block in stages {sorted(chosen)} of {type(model).__name__}")
    return Insertion(layers, report, n)


def dropblock_layers(model: nn.Module) -> list[DropBlock2d]:
    """Every DropBlock layer in ``model``."""
    return [m for m in model.modules() if isinstance(m, DropBlock2d)]
