"""Fully connected networks of rectified linear units, the models of Hinton, Vinyals and Dean's
MNIST experiments ("Distilling the Knowledge in a Neural Network", arXiv 1503.02531: a 2x1200
teacher, a 2x800 student), regularized as Hinton et al. regularized theirs ("Improving neural
networks by preventing co-adaptation of feature detectors", arXiv 1207.0580): dropout on the
hidden units and on the inputs, and an upper bound on the L2 norm of each hidden unit's incoming
weight vector (max-norm), enforced after every optimizer step.

``--model mlp:1200-1200`` brings this plugin into a run by itself: ``mlp:`` followed by the widths
of the hidden layers, joined by ``-``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

import tricks

__version__ = "0.1.0"
__all__ = ["MLP", "parse_widths", "max_norm_", "MLPModels", "MLPSettings"]

NAME = re.compile(r"^mlp:(\d+(?:-\d+)*)$")


def parse_widths(name: str) -> list[int] | None:
    """The hidden widths of ``mlp:W1-W2-...``; ``None`` for a name that is not an MLP's. A name
    that starts with ``mlp`` but is malformed is a TricksError naming the form."""
    if not name.startswith("mlp"):
        return None
    match = NAME.match(name)
    widths = [int(w) for w in match.group(1).split("-")] if match else []
    if not widths or min(widths) < 1:
        raise tricks.TricksError(f"model '{name}': an MLP is named mlp: followed by its hidden widths joined by '-', "
                                 "each at least 1 (e.g. --model mlp:1200-1200)")
    return widths


class MLP(nn.Module):
    """``flatten -> [input dropout] -> (linear -> ReLU -> dropout) x len(widths) -> linear head``.

    The hidden layers are ``hidden.0, hidden.1, ...`` (``nn.Linear``), the head ``fc``."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int, dropout: float = 0.0,
                 input_dropout: float = 0.0):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.hidden = nn.ModuleList()
        c = in_features
        for width in widths:
            self.hidden.append(nn.Linear(c, width))
            c = width
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(torch.flatten(x, 1))
        for layer in self.hidden:
            x = self.dropout(self.act(layer(x)))
        return self.fc(x)


@torch.no_grad()
def max_norm_(layers, bound: float) -> None:
    """Rescale every row of each layer's weight (one unit's incoming weights) whose L2 norm
    exceeds ``bound`` to norm ``bound``; rows within it are left exactly as they are."""
    for layer in layers:
        w = layer.weight
        norms = w.norm(dim=1, keepdim=True)
        w.mul_(torch.where(norms > bound, bound / norms.clamp_min(1e-12), torch.ones_like(norms)))


class MLPSettings(tricks.Settings):
    dropout: float = tricks.Field(0.0, ge=0, lt=1, description="dropout on the hidden units (Hinton et al. 2012 on MNIST: 0.5)")
    input_dropout: float = tricks.Field(0.0, ge=0, lt=1, description="dropout on the input pixels (Hinton et al. 2012 on MNIST: 0.2)")
    max_norm: float = tricks.Field(0.0, ge=0, description="upper bound on the L2 norm of each hidden unit's incoming weights, "
                                   "enforced after every optimizer step (0: none; Hinton et al. 2012 on MNIST: 15)")


class MLPModels(tricks.Plugin):
    """Fully connected ReLU networks (mlp:1200-1200), with dropout and max-norm constraints."""

    Settings = MLPSettings
    example_model = "mlp:32"

    def __init__(self, settings: MLPSettings | None = None):
        super().__init__(settings)
        self._optimizer = None
        self._handle = None

    @tricks.hookimpl
    def build_model(self, ctx):
        widths = parse_widths(ctx.core.model)
        if widths is None:
            return None
        s = self.settings
        in_features = ctx.in_chans * ctx.image_size * ctx.image_size
        model = MLP(in_features, widths, ctx.num_classes, s.dropout, s.input_dropout)
        params = sum(p.numel() for p in model.parameters())
        ctx.log(f"mlp: {in_features} inputs -> {' -> '.join(map(str, widths))} ReLU -> {ctx.num_classes}, "
                f"{params / 1e6:.2f}M parameters, dropout {s.dropout:g} (inputs {s.input_dropout:g})"
                + (f", max-norm {s.max_norm:g}" if s.max_norm else ""))
        return model

    def _attach(self, ctx) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._optimizer = ctx.optimizer
        model = ctx.model
        if not self.settings.max_norm or not isinstance(model, MLP):
            return
        layers, bound = list(model.hidden), self.settings.max_norm
        self._handle = ctx.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: max_norm_(layers, bound))

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if self.settings.max_norm and not isinstance(ctx.model, MLP):
            raise tricks.TricksError(f"mlp.max_norm constrains the hidden layers of an mlp: model, and {ctx.core.model} is not one; "
                                     "use --model mlp:W1-W2 or leave mlp.max_norm at 0")
        self._attach(ctx)

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        if ctx.optimizer is not self._optimizer:  # rebuilt after a structural change
            self._attach(ctx)
