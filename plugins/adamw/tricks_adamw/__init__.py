"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, arXiv 1711.05101):
Adam whose weight decay is decoupled from the gradient step. Each step first shrinks the weights,
``w <- w * (1 - lr * wd)``, then takes Adam's step on the gradient of the loss alone, instead of
adding ``wd * w`` to the gradient (L2), where Adam's normalisation would rescale it.

The optimizer is :class:`torch.optim.AdamW`, at the core's ``--lr`` and ``--weight-decay`` (one
``--lr`` for every optimizer, as in timm's train script); this plugin's settings are Adam's own
(``betas``, ``eps``, ``amsgrad``). :func:`make_adamw` builds it without the framework.
"""

from __future__ import annotations

import torch
from torch import nn

import tricks

__version__ = "0.1.0"

__all__ = ["LR_HINT_ABOVE", "AdamW", "AdamWSettings", "make_adamw"]

# A learning rate above this is SGD-sized for Adam: the run gets a one-line hint.
LR_HINT_ABOVE = 0.01


def make_adamw(model: nn.Module, lr: float, weight_decay: float, beta1: float = 0.9, beta2: float = 0.999,
               eps: float = 1e-8, amsgrad: bool = False) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over every parameter of ``model``."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps,
                             weight_decay=weight_decay, amsgrad=amsgrad)


class AdamWSettings(tricks.Settings):
    beta1: float = tricks.Field(0.9, ge=0, lt=1, description="decay rate of the first-moment (gradient) average, Adam's beta1")
    beta2: float = tricks.Field(0.999, ge=0, lt=1, description="decay rate of the second-moment (squared gradient) average, Adam's beta2")
    eps: float = tricks.Field(1e-8, gt=0, description="added to the root of the second moment before dividing, for stability")
    amsgrad: bool = tricks.Field(False, description="use the maximum of the past second moments (the AMSGrad variant)")


class AdamW(tricks.Plugin):
    """AdamW as the run's optimizer, at the core's --lr and --weight-decay."""

    Settings = AdamWSettings

    @tricks.hookimpl
    def configure_optimizer(self, ctx, model):
        c, s = ctx.core, self.settings
        if c.lr > LR_HINT_ABOVE:
            ctx.log(f"adamw: --lr {c.lr:g} is an SGD-sized rate; AdamW recipes use about 5e-4 to 1e-3 per 512 images "
                    "and weight decay 0.05, e.g. --lr 1e-3 --weight-decay 0.05")
        return make_adamw(model, c.lr, c.weight_decay, s.beta1, s.beta2, s.eps, s.amsgrad)
