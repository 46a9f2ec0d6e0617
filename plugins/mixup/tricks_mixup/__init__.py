"""mixup (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018, arXiv 1710.09412).

``x~ = lam * x_i + (1 - lam) * x_perm(i)``, ``y~ = lam * y_i + (1 - lam) * y_perm(i)``, one
``lam ~ Beta(alpha, alpha)`` per batch, the partner drawn from the same batch. The functions
below are the math, usable without the framework; :class:`Mixup` wires them to ``on_batch``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

import tricks

__version__ = "0.1.0"


def soft_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``[B]`` -> one-hot float ``[B, K]``; soft targets pass through unchanged."""
    if target.is_floating_point():
        return target
    return F.one_hot(target, num_classes).float()


def sample_lambda(alpha: float) -> float:
    """``lam ~ Beta(alpha, alpha)``, drawn on the host (no device sync); ``alpha <= 0`` gives 1
    (no mixing), as in the paper's code."""
    if alpha <= 0:
        return 1.0
    return float(_beta(float(alpha)).sample())


@functools.lru_cache(maxsize=16)
def _beta(alpha: float) -> torch.distributions.Beta:
    return torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))


def partner(batch_size: int, pairing: str, device: torch.device) -> torch.Tensor:
    """The index of each example's partner: a random permutation (the paper's code), the
    reversed batch (gluon-cv), or the batch rolled by one (torchvision)."""
    if pairing == "permutation":
        return torch.randperm(batch_size, device=device)
    if pairing == "reverse":
        return torch.arange(batch_size - 1, -1, -1, device=device)
    if pairing == "roll":
        return torch.arange(-1, batch_size - 1, device=device) % batch_size
    raise ValueError(f"unknown pairing {pairing!r}")


def mixup(x: torch.Tensor, target: torch.Tensor, lam: float, perm: torch.Tensor, num_classes: int,
          inplace: bool = False):
    """Mix a batch with its permutation: returns ``(lam*x + (1-lam)*x[perm], lam*y + (1-lam)*y[perm])``
    with ``y`` the one-hot (or already soft) targets. With ``inplace`` the mixed inputs are written
    into ``x`` itself (one fused kernel, no new batch); otherwise ``x`` is left unchanged.

    ``torch.lerp`` computes ``x + (1-lam) * (x[perm] - x)``, exact at ``lam`` 0 and 1 and for
    identical partners; ``index_select`` gathers the partners faster than ``x[perm]`` on a CPU.
    """
    y = soft_targets(target, num_classes)
    partners = x.index_select(0, perm)
    mixed_x = x.lerp_(partners, 1.0 - lam) if inplace else torch.lerp(x, partners, 1.0 - lam)
    mixed_y = torch.lerp(y, y.index_select(0, perm), 1.0 - lam)
    return mixed_x, mixed_y


class MixupSettings(tricks.Settings):
    alpha: float = tricks.Field(0.2, gt=0, description="lam ~ Beta(alpha, alpha); the paper uses 0.2 on ImageNet, 1.0 on CIFAR")
    prob: float = tricks.Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    pairing: Literal["permutation", "reverse", "roll"] = tricks.Field(
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
