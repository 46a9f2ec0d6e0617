"""The tensor math that the batch-mixing techniques share (mixup, CutMix, ...): the partner of each
example, one-hot (soft) targets, the mixing coefficient ``lam ~ Beta(alpha, alpha)``, and mixup's
convex combination of a batch with its partners. Plain functions, usable without the framework;
each mixing plugin imports them from here, so no plugin depends on another.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["PAIRINGS", "Pairing", "soft_targets", "sample_lambda", "partner", "mixup"]

Pairing = Literal["permutation", "reverse", "roll"]
PAIRINGS: tuple[str, ...] = Pairing.__args__


def soft_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``[B]`` -> one-hot float ``[B, K]``; soft targets pass through unchanged."""
    if target.is_floating_point():
        return target
    return F.one_hot(target, num_classes).float()


def sample_lambda(alpha: float) -> float:
    """``lam ~ Beta(alpha, alpha)``, drawn on the host (no device sync); ``alpha <= 0`` gives 1
    (no mixing), as in the mixup paper's code."""
    if alpha <= 0:
        return 1.0
    return float(_beta(float(alpha)).sample())


@functools.lru_cache(maxsize=16)
def _beta(alpha: float) -> torch.distributions.Beta:
    return torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))


def partner(batch_size: int, pairing: str, device: torch.device) -> torch.Tensor:
    """The index of each example's partner: a random permutation (the mixup paper's code), the
    reversed batch (gluon-cv, timm), or the batch rolled by one (torchvision)."""
    if pairing == "permutation":
        return torch.randperm(batch_size, device=device)
    if pairing == "reverse":
        return torch.arange(batch_size - 1, -1, -1, device=device)
    if pairing == "roll":
        return torch.arange(-1, batch_size - 1, device=device) % batch_size
    raise ValueError(f"unknown pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")


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
