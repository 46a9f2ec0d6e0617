"""No bias decay ("Bag of Tricks for Image Classification", arXiv 1812.01187, section 3.1): apply
weight decay only to the weights of convolutions and fully connected layers; biases and the
parameters of normalization layers (BatchNorm gamma and beta, ...) get none.

The functions are the math, usable without the framework: :func:`split_decay` sorts a model's
parameters, :func:`without_bias_decay` rebuilds an optimizer with the split parameter groups;
:class:`NoBiasDecay` applies it to the optimizer in force.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

import tricks

__version__ = "0.1.0"

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: the weights of convolutions and linear layers, and every other
    parameter (biases, normalization parameters, 1-D parameters such as scales)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_weight = (name == "weight" and not isinstance(module, NORMS) and p.ndim >= 2)
            (decay if is_weight else no_decay).append(p)
    return decay, no_decay


def without_bias_decay(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyperparameters in which every parameter group is
    split in two: the decayed weights keep the group's weight decay, the rest get 0."""
    decay, _ = split_decay(model)
    decay_ids = {id(p) for p in decay}
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        kept = [p for p in group["params"] if id(p) in decay_ids]
        free = [p for p in group["params"] if id(p) not in decay_ids]
        if kept:
            groups.append({**options, "params": kept})
        if free:
            groups.append({**options, "params": free, "weight_decay": 0.0})
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


class NoBiasDecaySettings(tricks.Settings):
    pass


class NoBiasDecay(tricks.Plugin):
    """Weight decay only on conv and linear weights; biases and normalization parameters get none."""

    Settings = NoBiasDecaySettings

    @tricks.hookimpl(wrapper=True)
    def configure_optimizer(self, ctx, model):
        optimizer = yield
        if optimizer.state:
            raise tricks.TricksError("no_bias_decay must split the optimizer before it has state; "
                                     "list it so that it wraps the optimizer when it is built")
        decay, no_decay = split_decay(model)
        ctx.log(f"no_bias_decay: weight decay on {len(decay)} weight tensors, none on {len(no_decay)} biases and norm parameters")
        return without_bias_decay(optimizer, model)
