"""Linear scaling of the learning rate with the batch size (Goyal et al. 2017, arXiv 1706.02677; as
used in "Bag of Tricks for Image Classification", arXiv 1812.01187): ``lr = base * b / 256``, so that
0.1 at batch 256 becomes 0.4 at batch 1024.

The function is the math, usable without the framework; :class:`LinearScaling` applies it to every
parameter group of the optimizer in force and logs the effective rate.
"""

from __future__ import annotations

import torch

import tricks

__version__ = "0.1.0"


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """``base_lr * batch_size / reference_batch``."""
    return base_lr * batch_size / reference_batch


def scale_optimizer(optimizer: torch.optim.Optimizer, batch_size: int, reference_batch: int = 256) -> float:
    """Multiply every parameter group's ``lr`` by ``batch_size / reference_batch``; returns the factor."""
    factor = batch_size / reference_batch
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    return factor


class LinearScalingSettings(tricks.Settings):
    reference_batch: int = tricks.Field(256, gt=0, description="the batch size at which the base rate applies (the paper: 256)")


class LinearScaling(tricks.Plugin):
    """Scale the learning rate by global batch size / reference batch; the effective rate is logged."""

    Settings = LinearScalingSettings

    @tricks.hookimpl(wrapper=True)
    def configure_optimizer(self, ctx, model):
        optimizer = yield
        batch, ref = ctx.core.batch_size, self.settings.reference_batch
        base = optimizer.param_groups[0]["lr"]
        scale_optimizer(optimizer, batch, ref)
        self.effective_lr = optimizer.param_groups[0]["lr"]
        ctx.log(f"linear_scaling: lr {base:g} x {batch}/{ref} = {self.effective_lr:g}")
        return optimizer
