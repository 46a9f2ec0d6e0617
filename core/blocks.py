"""Residual blocks: the one place that knows which modules of a model are residual blocks.

Model surgery asks two things of every residual block: which norm layer(s) end its residual
branch (zero-gamma sets their gamma to 0), and where its branch output and its shortcut are
(DropBlock goes there, before the addition). A :class:`BlockFamily` answers both for one kind of
block; :func:`register_block_family` teaches the project a new kind, once, for every plugin
(a model plugin whose blocks fit no built-in family calls it). Surgery also asks where a model's
stages are: :func:`find_stages`, taught new models by :func:`register_stage_finder`.

How a module is looked up, for one question (``last_norms`` or ``sites``):

1. a family registered for its class or a base class (the class itself, or its
   ``"module.QualName"`` so that no library is imported to name it) that answers the question:
   its answer is final, ``None`` included (this instance is not residual);
2. else the structural families (registered without classes), newest first: the first answer.

A family that does not answer a question (``sites=None``) leaves it to the others. When several
families claim one class, the newest wins.

Built in: the project's, torchvision's and timm's ResNet blocks; timm's RegNet,
MobileNet/EfficientNet and "bring your own blocks" blocks (each only where it has a shortcut);
and two structural families: a block with timm's ``zero_init_last()`` (the AnyNet/RegNet blocks
of ``regnet``, the blocks of ``resnet_tweaks``; the norms it zeroes are found by trying it on a
copy) and the ResNet structure (``conv1, bn1, conv2, bn2`` (+ ``conv3, bn3``) with a
``shortcut`` or ``downsample`` attribute, ``None`` for the identity).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BlockSites", "BlockFamily", "FoundBlock", "register_block_family", "unregister_block_family",
           "block_families", "last_norms", "block_sites", "find_blocks", "find_stages", "register_stage_finder",
           "resnet_norms", "resnet_sites", "zero_init_last_norms"]


@dataclass
class BlockSites:
    """Where DropBlock-like surgery acts in one residual block."""

    branch_end: nn.Module  # its output ends the residual branch (after the last norm), before the addition
    shortcut_attr: str  # the block's attribute holding the shortcut: None or nn.Identity = identity
    inner: list[nn.Module] = field(default_factory=list)  # the inner norm layers of the branch


@dataclass
class BlockFamily:
    """One kind of residual block.

    ``classes``: the block classes (or ``"module.QualName"`` strings) it claims; empty for a
    structural family, tried on every module that no class family answers.
    ``last_norms(block)``: the norm layer(s) ending the residual branch, or ``None`` when this
    instance is not a residual block. ``sites(block)``: its :class:`BlockSites`, or ``None``
    likewise. Either may be left out: the other families answer that question.
    """

    name: str
    classes: tuple[type | str, ...] = ()
    last_norms: Callable[[nn.Module], list[nn.Module] | None] | None = None
    sites: Callable[[nn.Module], BlockSites | None] | None = None

    def __post_init__(self):
        self.classes = tuple(self.classes)


class FoundBlock(NamedTuple):
    """A residual block of a model: its dotted name (``""`` for the model itself), the module, the
    family that recognised it and that family's answer to the question asked."""

    name: str
    module: nn.Module
    family: BlockFamily
    answer: Any


QUESTIONS = ("last_norms", "sites")
_FAMILIES: dict[str, BlockFamily] = {}  # by name, oldest first
_BY_CLASS: dict[type | str, BlockFamily] = {}
_STRUCTURAL: list[BlockFamily] = []  # newest first


def _reindex() -> None:
    _BY_CLASS.clear()
    for family in _FAMILIES.values():  # oldest first: the newest claim of a class wins
        _BY_CLASS.update(dict.fromkeys(family.classes, family))
    _STRUCTURAL[:] = [f for f in reversed(_FAMILIES.values()) if not f.classes]


def register_block_family(family: BlockFamily) -> BlockFamily:
    """Teach every plugin a kind of residual block; a family of the same name is replaced."""
    if family.last_norms is None and family.sites is None:
        raise ValueError(f"block family {family.name!r} answers nothing: give last_norms, sites or both")
    _FAMILIES.pop(family.name, None)
    _FAMILIES[family.name] = family
    _reindex()
    return family


def unregister_block_family(name: str) -> None:
    """Forget the family called ``name`` (no error when there is none)."""
    if _FAMILIES.pop(name, None) is not None:
        _reindex()


def block_families() -> list[BlockFamily]:
    """The registered families, oldest first."""
    return list(_FAMILIES.values())


def _class_keys(module: Any):
    for cls in type(module).__mro__:
        yield cls
        yield f"{cls.__module__}.{cls.__qualname__}"


def _lookup(table: dict, module: Any):
    return next((table[key] for key in _class_keys(module) if key in table), None)


def _ask(module: nn.Module, question: str) -> tuple[BlockFamily, Any] | None:
    """The family that answers ``question`` for ``module`` and its answer, or ``None``."""
    if question not in QUESTIONS:
        raise ValueError(f"unknown question {question!r}: ask one of {QUESTIONS}")
    for key in _class_keys(module):
        family = _BY_CLASS.get(key)
        if family is not None and getattr(family, question) is not None:
            answer = getattr(family, question)(module)
            return (family, answer) if answer else None
    for family in _STRUCTURAL:
        ask = getattr(family, question)
        answer = ask(module) if ask is not None else None
        if answer:
            return family, answer
    return None


def last_norms(module: nn.Module) -> list[nn.Module] | None:
    """The norm layer(s) ending the residual branch if ``module`` is a residual block, else ``None``."""
    found = _ask(module, "last_norms")
    return found[1] if found else None


def block_sites(module: nn.Module) -> BlockSites | None:
    """The :class:`BlockSites` of ``module`` if it is a residual block, else ``None``."""
    found = _ask(module, "sites")
    return found[1] if found else None


def find_blocks(model: nn.Module, question: str = "last_norms") -> list[FoundBlock]:
    """Every residual block of ``model`` that some family answers ``question`` for, in module order,
    outermost first (a block's inside is not searched)."""
    found: list[FoundBlock] = []

    def visit(name: str, module: nn.Module) -> None:
        answer = _ask(module, question)
        if answer is not None:
            found.append(FoundBlock(name, module, *answer))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


# --- stages ---------------------------------------------------------------------------------------

StageFinder = Callable[[nn.Module], "list[nn.Module] | None"]
_STAGE_FINDERS: dict[type | str, StageFinder] = {}


def register_stage_finder(cls: type | str, finder: StageFinder) -> None:
    """Teach :func:`find_stages` where the stages of a model class are (a list of modules, in order)."""
    _STAGE_FINDERS[cls] = finder


def _numbered(model: nn.Module, prefix: str) -> list[nn.Module] | None:
    stages, i = [], 1
    while isinstance(getattr(model, f"{prefix}{i}", None), nn.Module):
        stages.append(getattr(model, f"{prefix}{i}"))
        i += 1
    return stages or None


def find_stages(model: nn.Module) -> list[nn.Module] | None:
    """The stages of ``model`` in order, or ``None`` when they cannot be told: a registered finder
    for its class, else a ``stages`` container, ``layer1, layer2, ...`` (torchvision, timm ResNets)
    or ``s1, s2, ...`` (timm RegNets)."""
    finder = _lookup(_STAGE_FINDERS, model)
    if finder is not None:
        return finder(model)
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) > 0:
        return list(stages)
    return _numbered(model, "layer") or _numbered(model, "s")


# --- the built-in families ------------------------------------------------------------------------


def _is(module, attr, kind) -> bool:
    return isinstance(getattr(module, attr, None), kind)


def _resnet_shape(block: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The shortcut attribute and the branch's norms, first to last, of a ResNet-structured block."""
    attr = "shortcut" if hasattr(block, "shortcut") else "downsample" if hasattr(block, "downsample") else None
    if attr is None:
        return None
    if not all(_is(block, c, nn.Conv2d) and _is(block, b, _BatchNorm) for c, b in (("conv1", "bn1"), ("conv2", "bn2"))):
        return None
    if _is(block, "conv3", nn.Conv2d) and _is(block, "bn3", _BatchNorm):
        return attr, [block.bn1, block.bn2, block.bn3]
    if hasattr(block, "conv3") or hasattr(block, "bn3"):
        return None
    return attr, [block.bn1, block.bn2]


def resnet_norms(block: nn.Module) -> list[nn.Module] | None:
    """A ResNet basic (``bn2``) or bottleneck (``bn3``) block's last norm."""
    shape = _resnet_shape(block)
    return shape[1][-1:] if shape else None


def resnet_sites(block: nn.Module) -> BlockSites | None:
    """A ResNet basic or bottleneck block's sites: after its last BN, its shortcut, its inner BNs."""
    shape = _resnet_shape(block)
    return BlockSites(shape[1][-1], shape[0], shape[1][:-1]) if shape else None


def zero_init_last_norms(block: nn.Module) -> list[nn.Module] | None:
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


def _timm_regnet_norms(block):
    # timm's RegNet: ``downsample`` is the shortcut; None means the block has none (not residual)
    return [block.conv3.bn] if block.downsample is not None else None


def _timm_regnet_sites(block):
    if block.downsample is None:
        return None
    return BlockSites(block.conv3, "downsample", [block.conv1, block.conv2])


def _register_builtins() -> None:
    # structural families are tried newest first: zero_init_last() before the ResNet structure
    register_block_family(BlockFamily("resnet structure", last_norms=resnet_norms, sites=resnet_sites))
    register_block_family(BlockFamily("zero_init_last", last_norms=zero_init_last_norms))
    resnet = ("tricks.models.{}", "torchvision.models.resnet.{}", "timm.models.resnet.{}")
    register_block_family(BlockFamily("resnet basic", tuple(k.format("BasicBlock") for k in resnet),
                                      lambda b: [b.bn2], resnet_sites))
    register_block_family(BlockFamily("resnet bottleneck", tuple(k.format("Bottleneck") for k in resnet),
                                      lambda b: [b.bn3], resnet_sites))
    register_block_family(BlockFamily("timm regnet", ("timm.models.regnet.Bottleneck",),
                                      _timm_regnet_norms, _timm_regnet_sites))
    # pre-activation: no norm ends the branch
    register_block_family(BlockFamily("timm regnet pre-activation", ("timm.models.regnet.PreBottleneck",),
                                      lambda b: None))
    # timm's MobileNet/EfficientNet blocks: residual only where ``has_skip`` (same shape, stride 1)
    effnet = "timm.models._efficientnet_blocks."
    for cls, last in (("DepthwiseSeparableConv", "bn2"), ("InvertedResidual", "bn3"), ("EdgeResidual", "bn2")):
        register_block_family(BlockFamily(f"timm {cls}", (effnet + cls,),
                                          lambda b, last=last: [getattr(b, last)] if b.has_skip else None))
    # timm's "bring your own blocks" networks (ResNet-style *ts models, RegNetZ, GerNet): residual
    # only with a ``shortcut``; the same norms as their ``init_weights(zero_init_last=True)``
    byob = "timm.models.byobnet."
    for cls, last in (("BasicBlock", "conv2_kxk"), ("BottleneckBlock", "conv3_1x1"), ("DarkBlock", "conv2_kxk"),
                      ("EdgeBlock", "conv2_1x1"), ("SelfAttnBlock", "conv3_1x1")):
        norms = lambda b, last=last: [getattr(b, last).bn] if b.shortcut is not None else None  # noqa: E731
        register_block_family(BlockFamily(f"timm byob {cls}", (byob + cls,), norms))


_register_builtins()
