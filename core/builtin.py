"""The core's default hook implementations, registered as plugin ``core`` and called last."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hookspecs import hookimpl
from .models import create_model


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class indices (``int64 [B]``) or soft targets (floating ``[B, K]``)."""
    output = output.float()
    if target.is_floating_point():
        return -(target * F.log_softmax(output, dim=1)).sum(1).mean()
    return F.cross_entropy(output, target)


def base_loss(output, batch):
    """The default training loss: cross-entropy against ``batch["target"]``."""
    return cross_entropy(output, batch["target"])


def constant_schedule(step: int, total_steps: int, base_lr: float) -> float:
    """The default schedule: the base learning rate throughout."""
    return base_lr


class CoreDefaults:
    """Classification data and loaders, model provider, SGD, constant schedule, cross-entropy, accuracy."""

    @hookimpl(trylast=True)
    def load_data(self, ctx):
        from .data import load_data

        if ctx.core.task != "classification":
            return None  # the loop names the plugin that brings the task
        return load_data(ctx.core)

    @hookimpl(trylast=True)
    def make_loaders(self, ctx, data):
        from .data import make_loaders

        return make_loaders(data, ctx.core, ctx.device, ctx.rank, ctx.world_size)

    @hookimpl(trylast=True)
    def forward(self, ctx, model, batch):
        return model(batch["input"])

    @hookimpl(trylast=True)
    def build_model(self, ctx):
        return create_model(ctx.core.model, ctx.num_classes, ctx.in_chans)

    @hookimpl(trylast=True)
    def configure_optimizer(self, ctx, model):
        c = ctx.core
        return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                               nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay)

    @hookimpl(trylast=True)
    def configure_schedule(self, ctx, optimizer):
        return constant_schedule

    @hookimpl(trylast=True)
    def build_loss(self, ctx):
        return base_loss

    @hookimpl(trylast=True)
    def evaluate(self, ctx, model, loader):
        loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        correct = torch.zeros((), device=ctx.device, dtype=torch.float64)
        n = 0
        for batch in loader:
            with ctx.autocast():
                output = model(batch["input"])
            loss += F.cross_entropy(output.float(), batch["target"], reduction="sum")
            correct += (output.argmax(1) == batch["target"]).sum()
            n += len(batch["target"])
        return {"loss": loss, "acc": correct, "n": n}
