"""Stochastic depth, or drop path (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016,
arXiv 1603.09382): in training, the residual branch of block ``l`` is dropped for a whole sample
with probability ``p_l`` (the block is the identity, or its shortcut, for that sample) and scaled by
``1 / (1 - p_l)`` otherwise, so that its expectation is unchanged; in evaluation every branch is
kept, unscaled. The per-sample mask is timm's :func:`timm.layers.drop_path`, drawn from torch's
global generator (which the core seeds per epoch).

Where the drop goes, for each module of the model, outermost first (a block's inside is not
searched), in this order:

a. a transformer block with ``drop_path1`` and ``drop_path2`` (timm's ViT ``Block``, Swin, the
   project's ViT): both become ``timm.layers.DropPath(p_l)``, one rate per block;
b. a block with a ``drop_path`` attribute (timm's ResNet, RegNet, EfficientNet, ConvNeXt and
   "bring your own blocks" blocks): it is set to ``DropPath(p_l)``;
c. a residual block of the core's block protocol (:func:`tricks.blocks.block_sites`: the core's
   CIFAR ResNets, torchvision's ResNets): a ``DropPath(p_l)`` child called ``drop_path`` is added
   to the block and applied to the output of ``BlockSites.branch_end`` (the end of the residual
   branch, before the addition) by a forward hook. The module tree's parameters and buffers
   are untouched, so ``state_dict`` keys stay the same and checkpoints still load.

``DropPath`` has no parameters or buffers, so in every case the state dict is unchanged.

:func:`drop_rates` is the rule, :func:`find_sites` the search and :func:`apply_drop_path` the
surgery, all usable without the framework; :class:`DropPath` applies them to the run's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import DropPath as TimmDropPath
from torch import nn

import tricks
from tricks.blocks import block_sites

__version__ = "0.1.0"

__all__ = ["DropPath", "DropPathSettings", "Site", "apply_drop_path", "drop_rates", "find_sites"]

RULES = ("linear", "uniform")


def drop_rates(n: int, rate: float, rule: str = "linear") -> list[float]:
    """The drop probability of each of ``n`` blocks, in forward order.

    ``linear``: ``rate * l / (n - 1)`` for ``l = 0 .. n-1``, computed as timm does
    (``torch.linspace(0, rate, n)``), so the first block is never dropped and the deepest is
    dropped with probability ``rate``; a single block gets ``rate``. ``uniform``: ``rate`` everywhere.
    """
    if rule not in RULES:
        raise ValueError(f"unknown drop path rule {rule!r}: use one of {', '.join(RULES)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate {rate} is not in [0, 1)")
    if n <= 0:
        return []
    if rule == "uniform" or n == 1:
        return [float(rate)] * n
    return torch.linspace(0, rate, n).tolist()


@dataclass
class Site:
    """One block that takes drop path: its dotted name, the module and how (``"transformer"``:
    ``drop_path1``/``drop_path2``; ``"attribute"``: ``drop_path``; ``"residual"``: a hook on the
    end of its residual branch, ``branch_end``)."""

    name: str
    block: nn.Module
    kind: str
    branch_end: nn.Module | None = None


def _is_slot(block: nn.Module, attr: str) -> bool:
    """``block.attr`` exists and holds a module or ``None`` (timm's blocks keep ``None`` for "no drop path")."""
    if not hasattr(block, attr):
        return False
    value = getattr(block, attr)
    return value is None or isinstance(value, nn.Module)


def _site(name: str, module: nn.Module) -> Site | None:
    if isinstance(module, TimmDropPath):
        return None
    if _is_slot(module, "drop_path1") and _is_slot(module, "drop_path2"):
        return Site(name, module, "transformer")
    if _is_slot(module, "drop_path"):
        return Site(name, module, "attribute")
    sites = block_sites(module)
    if sites is not None:
        return Site(name, module, "residual", sites.branch_end)
    return None


def find_sites(model: nn.Module) -> list[Site]:
    """The blocks of ``model`` that take drop path, in module order (forward order for the models
    above), outermost first: a block's inside is not searched."""
    found: list[Site] = []

    def visit(name: str, module: nn.Module) -> None:
        site = _site(name, module)
        if site is not None:
            found.append(site)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


class _DropBranch:
    """A forward hook on the module that ends a block's residual branch: its output goes through
    the block's ``drop_path`` layer (a child of the block, so it follows the block's ``train()``
    and ``eval()``). A class, not a closure, so that ``copy.deepcopy`` of the model gives a copy
    whose hook uses the copy's layer."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, module, args, output):
        layer = getattr(self.block, "drop_path", None)
        return output if layer is None else layer(output)


def _hooked(module: nn.Module, block: nn.Module) -> bool:
    return any(isinstance(h, _DropBranch) and h.block is block for h in module._forward_hooks.values())


def apply_drop_path(model: nn.Module, rate: float = 0.1, rule: str = "linear") -> list[tuple[Site, float]]:
    """Put drop path into every block :func:`find_sites` finds in ``model``, in place, with the
    rates of :func:`drop_rates`; returns each site with its rate (empty when there is none).
    Applying it again replaces the rates."""
    sites = find_sites(model)
    rates = drop_rates(len(sites), rate, rule)
    for site, p in zip(sites, rates):
        block = site.block
        if site.kind == "transformer":
            block.drop_path1 = TimmDropPath(p)
            block.drop_path2 = TimmDropPath(p)
        else:
            block.drop_path = TimmDropPath(p)
            if site.kind == "residual" and not _hooked(site.branch_end, block):
                site.branch_end.register_forward_hook(_DropBranch(block))
    return list(zip(sites, rates))


class DropPathSettings(tricks.Settings):
    rate: float = tricks.Field(0.1, ge=0, lt=1, description="drop probability of the deepest residual block (timm's drop_path_rate)")
    rule: Literal["linear", "uniform"] = tricks.Field(
        "linear", description="linear: block l of L drops with rate * l / (L - 1), from 0 to rate (timm, DeiT); uniform: every block drops with rate")


class DropPath(tricks.Plugin):
    """Stochastic depth: drop whole residual branches per sample in training."""

    Settings = DropPathSettings

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        s = self.settings
        applied = apply_drop_path(model, s.rate, s.rule)
        if not applied:
            raise tricks.TricksError(
                f"drop_path: model '{ctx.core.model}' ({type(model).__name__}) has no residual blocks to drop; "
                "use a model with residual blocks (e.g. --model resnet20, a ViT, or timm:resnet18), or leave drop_path out")
        rates = [p for _, p in applied]
        kinds = sorted({site.kind for site, _ in applied})
        ctx.log(f"drop_path: {len(applied)} blocks ({', '.join(kinds)}), drop rates {min(rates):.4g} to "
                f"{max(rates):.4g} ({s.rule})")
        return model
