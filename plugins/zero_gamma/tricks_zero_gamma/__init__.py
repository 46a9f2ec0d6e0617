"""Zero-gamma initialization ("Bag of Tricks for Image Classification with Convolutional Neural
Networks", He et al., CVPR 2019, arXiv 1812.01187, section 3.1).

Set gamma (the weight) of the last BatchNorm of every residual block's residual branch to 0:
the branch then outputs its BN's beta, 0 at initialization, and every block starts as its
shortcut - the identity for blocks that keep the shape. :func:`zero_gamma` does it to any model
whose residual blocks it recognises; :class:`ZeroGamma` applies it to the run's model.

Which modules are residual blocks, and which norm layer ends their branch, is a small rule set:

1. a handler registered for the block's class (or a base class), by :func:`register_handler`:
   the project's ResNet blocks, torchvision's, timm's ResNet, RegNet, MobileNet/EfficientNet and
   "bring your own blocks" blocks (each only where it has a shortcut);
2. a block that offers ``zero_init_last()`` (timm's protocol, also followed by the tweaked
   ResNets of ``resnet_tweaks``): the method does the zeroing, and the norm it zeroes is found
   by trying it on a copy;
3. the ResNet structure: ``conv1, bn1, conv2, bn2`` (+ ``conv3, bn3``) and a ``shortcut`` or
   ``downsample`` attribute (``None`` is the identity).

Another plugin teaches it a new block with ``register_handler(MyBlock, lambda b: [b.bn3])`` (or
by giving the block a ``zero_init_last()`` method); a handler returns ``None`` for a module of
that class that is not residual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tricks

__version__ = "0.1.0"
__all__ = ["zero_gamma", "find_residual_blocks", "register_handler", "register_rule", "last_norms",
           "ResidualBlock", "ZeroGamma", "ZeroGammaSettings"]

Handler = Callable[[nn.Module], "list[nn.Module] | None"]

# class (or "module.QualName", so that no library need be imported) -> handler
_HANDLERS: dict[type | str, Handler] = {}
# structural rules, tried in order on modules no handler claims
_RULES: list[Handler] = []


def register_handler(cls: type | str, handler: Handler) -> None:
    """Teach zero-gamma a block class: ``handler(block)`` returns the norm layer(s) that end the
    residual branch, or ``None`` when this instance is not a residual block. ``cls`` is a class
    or its ``"module.QualName"``; subclasses inherit the handler unless they have their own."""
    _HANDLERS[cls] = handler


def register_rule(rule: Handler, first: bool = True) -> None:
    """Add a structural rule, tried on every module that no class handler claims."""
    _RULES.insert(0 if first else len(_RULES), rule)


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _handler_for(module: nn.Module) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
        key = _class_key(cls)
        if key in _HANDLERS:
            return _HANDLERS[key]
    return None


def last_norms(module: nn.Module) -> list[nn.Module] | None:
    """The norm layer(s) ending the residual branch if ``module`` is a residual block, else ``None``."""
    handler = _handler_for(module)
    if handler is not None:
        return handler(module) or None
    for rule in _RULES:
        norms = rule(module)
        if norms:
            return norms
    return None


# --- the rules ------------------------------------------------------------------------------------


def _is(module, attr, kind) -> bool:
    return isinstance(getattr(module, attr, None), kind)


def resnet_block_rule(block: nn.Module) -> list[nn.Module] | None:
    """A ResNet basic (``bn2``) or bottleneck (``bn3``) block: convs and BNs by those names, and a
    shortcut attribute (``shortcut`` or ``downsample``; ``None`` for the identity)."""
    if not (hasattr(block, "shortcut") or hasattr(block, "downsample")):
        return None
    if not all(_is(block, c, nn.Conv2d) and _is(block, b, _BatchNorm) for c, b in (("conv1", "bn1"), ("conv2", "bn2"))):
        return None
    if _is(block, "conv3", nn.Conv2d) and _is(block, "bn3", _BatchNorm):
        return [block.bn3]
    if hasattr(block, "conv3") or hasattr(block, "bn3"):
        return None
    return [block.bn2]


def zero_init_last_rule(block: nn.Module) -> list[nn.Module] | None:
    """A block with timm's ``zero_init_last()``: the norm layers it zeroes, found on a copy whose
    norm weights are all set to 1 first (so an already-zero gamma cannot hide the answer)."""
    if not callable(getattr(block, "zero_init_last", None)):
        return None
    norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.weight is not None]
    if not norms:
        return None
    probe = copy.deepcopy(block)
    probe_norms = [m for m in probe.modules() if isinstance(m, _BatchNorm) and m.weight is not None]
    with torch.no_grad():
        for m in probe_norms:
            m.weight.fill_(1.0)
    probe.zero_init_last()
    zeroed = [norm for norm, m in zip(norms, probe_norms) if not m.weight.detach().any()]
    return zeroed or None


def _timm_regnet_bottleneck(block):
    # timm's RegNet: ``downsample`` is the shortcut; None means the block has none (not residual)
    return [block.conv3.bn] if block.downsample is not None else None


for _cls in ("tricks.models.BasicBlock", "torchvision.models.resnet.BasicBlock", "timm.models.resnet.BasicBlock"):
    register_handler(_cls, lambda b: [b.bn2])
for _cls in ("tricks.models.Bottleneck", "torchvision.models.resnet.Bottleneck", "timm.models.resnet.Bottleneck"):
    register_handler(_cls, lambda b: [b.bn3])
register_handler("timm.models.regnet.Bottleneck", _timm_regnet_bottleneck)
register_handler("timm.models.regnet.PreBottleneck", lambda b: None)  # pre-activation: no BN ends the branch
# timm's MobileNet/EfficientNet blocks: residual only where ``has_skip`` (same shape, stride 1)
_EFFICIENTNET = "timm.models._efficientnet_blocks."
register_handler(_EFFICIENTNET + "DepthwiseSeparableConv", lambda b: [b.bn2] if b.has_skip else None)
register_handler(_EFFICIENTNET + "InvertedResidual", lambda b: [b.bn3] if b.has_skip else None)
register_handler(_EFFICIENTNET + "EdgeResidual", lambda b: [b.bn2] if b.has_skip else None)
# timm's "bring your own blocks" networks (ResNet-style *ts models, RegNetZ, GerNet): residual
# only with a ``shortcut``; the same norms as their ``init_weights(zero_init_last=True)``
_BYOB = "timm.models.byobnet."
for _cls, _last in (("BasicBlock", "conv2_kxk"), ("BottleneckBlock", "conv3_1x1"), ("DarkBlock", "conv2_kxk"),
                    ("EdgeBlock", "conv2_1x1"), ("SelfAttnBlock", "conv3_1x1")):
    register_handler(_BYOB + _cls, lambda b, last=_last: [getattr(b, last).bn] if b.shortcut is not None else None)
register_rule(zero_init_last_rule, first=False)
register_rule(resnet_block_rule, first=False)


# --- the surgery ----------------------------------------------------------------------------------


@dataclass
class ResidualBlock:
    """A residual block found in a model: its name, the module, and the norms ending its branch."""

    name: str
    module: nn.Module
    norms: list[nn.Module]
    was_zero: bool = False


def find_residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """Every residual block of ``model``, outermost first (a block's inside is not searched)."""
    found: list[ResidualBlock] = []

    def visit(name: str, module: nn.Module) -> None:
        norms = last_norms(module)
        if norms:
            found.append(ResidualBlock(name or type(module).__name__, module, norms))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


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
