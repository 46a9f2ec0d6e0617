"""mixup (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018, arXiv 1710.09412).

``x~ = lam * x_i + (1 - lam) * x_perm(i)``, ``y~ = lam * y_i + (1 - lam) * y_perm(i)``, one
``lam ~ Beta(alpha, alpha)`` per batch, the partner drawn from the same batch. The math is plain
functions in the core's :mod:`tricks.mixing` (shared with ``cutmix``), re-exported here;
:class:`Mixup` wires them to ``on_batch``.
"""

from __future__ import annotations

import torch

import tricks
from tricks.mixing import Pairing, mixup, partner, sample_lambda, soft_targets

__version__ = "0.1.0"
__all__ = ["mixup", "partner", "sample_lambda", "soft_targets", "Mixup", "MixupSettings"]


class MixupSettings(tricks.Settings):
    alpha: float = tricks.Field(0.2, gt=0, description="lam ~ Beta(alpha, alpha); the paper uses 0.2 on ImageNet, 1.0 on CIFAR")
    prob: float = tricks.Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    pairing: Pairing = tricks.Field(
        "permutation", description="how partners are chosen: permutation (paper), reverse (gluon-cv), roll (torchvision)")


class Mixup(tricks.Plugin):
    """Mix each training batch with a permutation of itself; soft targets for the loss."""

    Settings = MixupSettings

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        s = self.settings
        if s.prob < 1.0 and torch.rand(()).item() >= s.prob:
            return None
        x, target = batch["input"], batch["target"]
        lam = sample_lambda(s.alpha)
        perm = partner(x.shape[0], s.pairing, x.device)
        # in place: the core hands every step a new batch, so only this step's tensor is written
        batch["input"], batch["target"] = mixup(x, target, lam, perm, ctx.num_classes, inplace=True)
        return batch
