"""Which channels are coupled, and removing them: Torch-Pruning's dependency graph, seen as groups.

Removing an output channel of one layer removes the matching input channels of the layers that
read it, and the same channel of every layer whose output is added to it (a residual stream),
concatenated with it, normalized with it, or gated with it (squeeze-and-excitation). Torch-Pruning
(``torch_pruning``, MIT, Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023, arXiv
2301.12900) traces the model once and finds these couplings; :func:`find_groups` presents each set
of coupled channels as a :class:`ChannelGroup` named by its first layer, and :func:`apply_steps`
removes channels of groups by that name, so that a change is data (a layer name and channel
indices) that :func:`apply_steps` can make again on a fresh model of the same architecture.

What is never removed: the output channels of a layer that feeds the model's output (the
classifier's classes; every tensor the model returns, in a tuple, list or dict, counts, also one
that other layers read further: a detector backbone's stage outputs feed its feature pyramid
outside the traced module, so their widths stay), the channels of a group any of whose layers is
excluded by name, and the last ``min_channels`` of a group. Grouped convolutions keep their group count: a group that holds
one is cut in *positions* (:attr:`ChannelGroup.units`), the same position of every convolution
group at once, so the channels stay divisible by the group count and every group keeps the same
width (Torch-Pruning's own rule); a depthwise convolution is coupled channel by channel with its
input and is cut with it.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tricks

__all__ = ["Member", "ChannelGroup", "build_graph", "find_groups", "apply_steps", "complexity", "matches",
           "prunable_layers", "NORMS", "stream_layers"]

NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Member:
    """One module of a group: ``idxs[j]``, a channel of the module, is channel ``root_idxs[j]`` of
    the group. ``out`` is True when the group is the module's output channels (a producer: conv,
    linear or norm), False when it is the module's input channels (a consumer)."""

    name: str
    module: nn.Module
    out: bool
    idxs: list[int]
    root_idxs: list[int]

    @property
    def kind(self) -> str:
        if isinstance(self.module, LAYERS):
            return "layer"
        if isinstance(self.module, NORMS):
            return "norm"
        return "other"


@dataclass
class ChannelGroup:
    """A set of coupled channels that are removed together.

    ``key``: the qualified name of the first layer (in the model's module order) whose output
    channels are the group; channel indices of the group are that layer's output channels.
    ``size``: the channels; ``ch_groups``: the convolution groups that must keep equal widths
    (1 without a grouped convolution): the group is cut in ``units = size // ch_groups``
    positions, unit ``u`` being channels ``u, u + units, u + 2 units, ...``. ``prunable`` is False
    (``why`` says why) for a group that feeds the model's output or holds an excluded layer.
    """

    key: str
    size: int
    ch_groups: int
    members: list[Member]
    order: int
    prunable: bool = True
    why: str = ""
    min_units: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return self.size // self.ch_groups

    @property
    def producers(self) -> list[Member]:
        """The members whose output channels the group is: layers and norms."""
        return [m for m in self.members if m.out and m.kind != "other"]

    @property
    def layers(self) -> list[Member]:
        """The conv and linear layers whose output channels the group is."""
        return [m for m in self.members if m.out and m.kind == "layer"]

    def channels(self, units: Iterable[int]) -> list[int]:
        """The channels of the group's ``units`` (positions), sorted."""
        n = self.units
        return sorted(int(u) + g * n for u in units for g in range(self.ch_groups))

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-channel scores (``size``) as per-unit scores (``units``): the mean over the
        convolution groups, as Torch-Pruning does for grouped convolutions."""
        return scores.reshape(self.ch_groups, self.units).mean(0)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether the qualified module name ``name`` matches one of the fnmatch ``patterns``
    (``stem*``, ``stages.0.*``, ``fc``); a pattern also matches the modules inside a match."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def stream_layers(groups: Sequence[ChannelGroup]) -> list[str]:
    """The names of the layers whose outputs are summed into a residual stream: the producers of
    every group made by more than one conv or linear layer (a ResNet stage's stem or shortcut and
    each block's last convolution). Excluding them (``exclude=``) prunes only inside the blocks, as
    Li et al., Liu et al. (Network Slimming) and Zhuang et al. (DCP) do on ResNets."""
    return [m.name for g in groups if len(g.layers) > 1 for m in g.layers]


def prunable_layers(model: nn.Module) -> list[str]:
    """The qualified names of the conv and linear layers of ``model``, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, LAYERS)]


@contextlib.contextmanager
def _quiet_forward(model: nn.Module):
    """Evaluation mode, gradients on, the random state kept: tracing must not train the model
    (BatchNorm statistics), draw random numbers (dropout, DropBlock) or leave modes changed."""
    modes = [(m, m.training) for m in model.modules()]
    first = next(iter(model.parameters()), None)
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or tensors in (nested) tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def build_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model``, traced with ``example_inputs`` in eval mode.

    The graph also keeps (``dg.output_grad_fns``) the autograd nodes of the tensors the model
    returned, so that :func:`find_groups` knows every output, including one that other layers of
    the model read too (Torch-Pruning only sees the graph's dead ends)."""
    import torch_pruning as tp

    outputs: list = []

    def keep(out):
        outputs.extend(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)
        return out

    with _quiet_forward(model):
        try:
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, output_transform=keep,
                                                       verbose=False)
        except Exception as error:
            raise tricks.TricksError(
                f"prune: cannot trace {type(model).__name__} to find its coupled channels "
                f"({type(error).__name__}: {error}); structured pruning needs a model Torch-Pruning can trace") from None
    dg.output_grad_fns = outputs
    return dg


def _feeds_output(dg, module: nn.Module) -> bool:
    """Whether the output channels of ``module`` reach the model's output without passing through
    another conv or linear layer (a classifier, or a layer whose output is returned). An output is
    a dead end of the graph or a tensor the model returned (``dg.output_grad_fns``, set by
    :func:`build_graph`), such as a backbone's stage output that the next stage reads too."""
    start = dg.module2node.get(module)
    if start is None:
        return False
    returned = getattr(dg, "output_grad_fns", ())
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not node.outputs or any(node.grad_fn is g for g in returned):
            return True
        for nxt in node.outputs:
            m = nxt.module
            depthwise = isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1
            if isinstance(m, LAYERS) and not depthwise:
                continue
            stack.append(nxt)
    return False


def _ch_groups(members: list[Member]) -> int:
    """The convolution (or GroupNorm) groups the channels of a group must keep equal widths in."""
    found = [1]
    for m in members:
        module = m.module
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1:
            if module.groups == module.out_channels:  # depthwise: coupled channel by channel
                continue
            found.append(module.groups)
        elif isinstance(module, nn.GroupNorm) and module.num_groups > 1:
            found.append(module.num_groups)
    return max(found)


def _members(dg, group, names: dict[nn.Module, str]) -> list[Member]:
    out = []
    for item in group:
        module = item.dep.target.module
        name = names.get(module) if isinstance(module, nn.Module) else None
        if name is None:
            continue  # an operation (addition, concatenation, reshape): no parameters of its own
        out.append(Member(name, module, dg.is_out_channel_pruning_fn(item.dep.handler),
                          [int(i) for i in item.idxs], [int(i) for i in item.root_idxs]))
    return out


def find_groups(model: nn.Module, example_inputs: torch.Tensor, exclude: Sequence[str] = (), min_channels: int = 1,
                dg=None):
    """``(dg, groups)``: the dependency graph of ``model`` and every :class:`ChannelGroup` rooted at a
    conv or linear layer, in module order, each marked prunable or not (``exclude``: fnmatch
    patterns of layer names whose output channels stay; ``min_channels``: the fewest channels a
    group keeps)."""
    dg = dg if dg is not None else build_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    groups: list[ChannelGroup] = []
    for raw in dg.get_all_groups(root_module_types=LAYERS):
        members = _members(dg, raw, names)
        layers = [m for m in members if m.out and m.kind == "layer"]
        if not layers:
            continue
        first = min(layers, key=lambda m: order[m.name])
        pruner = dg.get_pruner_of_module(first.module)
        size = pruner.get_out_channels(first.module)
        # the group again, rooted at its first layer, so that its channels are that layer's
        group = dg.get_pruning_group(first.module, pruner.prune_out_channels, list(range(size)))
        members = _members(dg, group, names)
        ch_groups = _ch_groups(members)
        if size % ch_groups:
            ch_groups = 1
        g = ChannelGroup(key=first.name, size=size, ch_groups=ch_groups, members=members, order=order[first.name])
        g.min_units = max(1, -(-min_channels // ch_groups))
        excluded = [m.name for m in g.layers if matches(m.name, exclude)]
        output = [m.name for m in g.layers if _feeds_output(dg, m.module)]
        if output:
            g.prunable, g.why = False, f"{output[0]} feeds the model's output"
        elif excluded:
            g.prunable, g.why = False, f"{excluded[0]} is excluded"
        elif g.units <= g.min_units:
            g.prunable, g.why = False, f"{g.size} channels, at most the minimum to keep"
        groups.append(g)
    groups.sort(key=lambda g: g.order)
    return dg, groups


def apply_steps(model: nn.Module, example_inputs: torch.Tensor, steps: Sequence[dict], dg=None) -> nn.Module:
    """Remove, in order, the channels ``step["idxs"]`` of the group whose first layer is
    ``step["layer"]`` (indices of that layer's output channels in the model as it is at that
    step), with every coupled channel, in place. Returns ``model``."""
    if not steps:
        return model
    dg = dg if dg is not None else build_graph(model, example_inputs)
    with _quiet_forward(model):
        for i, step in enumerate(steps):
            layer, idxs = step.get("layer"), step.get("idxs")
            try:
                module = model.get_submodule(str(layer))
            except AttributeError:
                module = None
            if module is None or not isinstance(module, LAYERS) or module not in dg.module2node:
                raise tricks.TricksError(
                    f"prune: step {i + 1} of the change removes channels of layer {layer!r}, which "
                    f"{type(model).__name__} has not (or not as a traced conv/linear layer); a change replays only on "
                    "the architecture it was made on")
            pruner = dg.get_pruner_of_module(module)
            size = pruner.get_out_channels(module)
            idxs = sorted({int(i) for i in idxs or []})
            if not idxs:
                continue
            if idxs[0] < 0 or idxs[-1] >= size:
                raise tricks.TricksError(
                    f"prune: step {i + 1} of the change removes channel {idxs[-1] if idxs[-1] >= size else idxs[0]} of "
                    f"{layer}, which has {size} output channels; a change replays only on the architecture it was made on")
            group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs)
            if not dg.check_pruning_group(group):
                raise tricks.TricksError(f"prune: step {i + 1} would remove every channel of a layer coupled with {layer}")
            group.prune()
    return model


def complexity(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """``{"params", "macs"}``: the parameter count of ``model`` and the multiply-accumulates of a
    forward pass of one image of ``example_inputs`` (half the FLOPs torch's ``FlopCounterMode``
    counts), in eval mode, without gradients; modes and the random state are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with _quiet_forward(model), torch.no_grad(), counter:
        model(example_inputs[:1])
    return {"params": params, "macs": counter.get_total_flops() // 2}
